"""What every benchmark prints and writes: a JSON line per row as it is measured, the rows as a
JSON file, and a Markdown table to paste into benchmarks/RESULTS.md."""

from __future__ import annotations

import json
from pathlib import Path


def emit(row: dict) -> None:
    """One measured row, as a JSON line (flushed: long runs show progress)."""
    print(json.dumps(row), flush=True)


def write_rows(rows: list[dict], out: str | None) -> None:
    """The rows as JSON in ``out`` (nothing without one)."""
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))


def markdown(rows: list[dict], columns: dict[str, str]) -> str:
    """A Markdown table of ``rows``: one column per ``header: key`` of ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[key]) for key in columns.values()) + " |" for row in rows]
    return "\n".join(lines)
