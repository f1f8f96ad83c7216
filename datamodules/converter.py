"""The engine every dataset converter runs on: items -> schema samples -> deterministic shards.

A converter lists its source items (cheap metadata: ids, file paths, annotations) and gives a
function turning one item into a sample dict (``__key__``, ``jpg``/``png``, ``json``, ...) or
a :class:`Drop` with a reason. The engine then

- splits items into ``train``/``val`` by a stable hash of their source id (a sample never moves
  between splits when the dataset grows),
- cuts each split, in the converter's order, into shards of ``samples_per_shard`` items, so
  every item has a fixed shard: ``<split>-%06d.tar`` (brace-expandable names); with a target
  shard size in bytes instead, the count is estimated once from the first converted samples and
  kept in ``layout.json``, so a resumed run cuts the same shards,
- converts shards in parallel processes, each written to a temporary file and renamed when
  complete, with its statistics beside it (``<shard>.json``): a rerun skips finished shards,
  so an interrupted conversion resumes, and writes byte-identical tars (fixed tar metadata),
- holds one shard's samples in memory at a time (constant memory in the dataset size),
- writes ``summary.json`` (samples written, dropped per reason, per split) and shows progress.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import io
import json
import os
import re
import signal
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from datamodules.schema import key_problem


@dataclass
class Drop:
    """An item that does not become a sample, and why (a short, stable reason key)."""

    reason: str


def split_of(source_id: str, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` of source ids, else ``train``."""
    digest = hashlib.sha256(source_id.encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def unlabel_off_image(keypoints, width: int, height: int) -> np.ndarray:
    """Keypoints ``[K, 3]`` rounded to 0.01 px, those off the ``width`` x ``height`` image set
    to ``(0, 0, 0)`` (unlabelled), as the schema requires."""
    kp = np.asarray(keypoints, dtype=np.float64).copy()
    off = (kp[:, 0] < 0) | (kp[:, 0] > width) | (kp[:, 1] < 0) | (kp[:, 1] > height)
    kp[off] = 0
    return kp.round(2)


def read_rgb(path) -> np.ndarray | Drop:
    """An image file as RGB ``[H, W, 3]`` uint8, or ``Drop("unreadable_image")``."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception:  # PIL raises many types for unreadable or missing files
        return Drop("unreadable_image")


def encode_jpeg(image: np.ndarray | Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, samples: Sequence[dict]) -> None:
    """Write samples as a WebDataset tar with fixed metadata (mtime 0, root owner) so the same
    samples always give the same bytes; written to ``<path>.tmp`` and renamed when complete."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext in sorted(k for k in sample if not k.startswith("__")):
                data = sample[ext]
                data = data if isinstance(data, bytes) else json.dumps(data).encode()
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def parse_size(text: str) -> int:
    """``"1GB"``, ``"500MB"``, ``"64k"``, ``"123"`` -> bytes (decimal units).

    >>> parse_size("1.5GB"), parse_size("64k"), parse_size("123")
    (1500000000, 64000, 123)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)b?\s*", text.lower())
    if match is None:
        raise ValueError(f"shard size {text!r}: expected a number with an optional unit, e.g. 1GB")
    number, unit = match.groups()
    return int(float(number) * 1000 ** " kmgt".index(unit or " "))


def _tar_bytes(sample: dict) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member plus data padded to 512."""
    sizes = [len(v if isinstance(v, bytes) else json.dumps(v).encode())
             for k, v in sample.items() if not k.startswith("__")]  # fmt: skip
    return sum(512 + -(-size // 512) * 512 for size in sizes)


def estimate_samples_per_shard(
    items: Sequence, convert: Callable[[object], dict | Drop], shard_bytes: int, probe: int = 16
) -> int:
    """Samples per shard so a shard is about ``shard_bytes``, from the mean tar size of the
    first ``probe`` items that convert (deterministic: always the same items)."""
    sizes = [_tar_bytes(r) for r in map(convert, items[:probe]) if not isinstance(r, Drop)]
    if not sizes:
        return 1000
    return max(1, int(shard_bytes * len(sizes) // sum(sizes)))


def _layout(out: Path, samples_per_shard: int | None, estimate: Callable[[], int]) -> int:
    """The shard length of ``out``: the one a previous run used (so resuming cuts the same
    shards), the requested one, or an estimate; a conflicting request is an error."""
    file = out / "layout.json"
    if file.is_file():
        kept = json.loads(file.read_text())["samples_per_shard"]
        if samples_per_shard is not None and samples_per_shard != kept:
            raise SystemExit(
                f"{file}: these shards were cut with samples_per_shard={kept}, not "
                f"{samples_per_shard}; resume with the same value or use a new output folder"
            )
        return kept
    chosen = samples_per_shard if samples_per_shard is not None else estimate()
    file.write_text(json.dumps({"samples_per_shard": chosen}))
    return chosen


def _convert_shard(job) -> dict:
    convert, items, path = job
    samples, drops = [], Counter()
    for item in items:
        result = convert(item)
        if not isinstance(result, Drop) and key_problem(result["__key__"]) is not None:
            # keys become file names downstream; a source's ids are not trusted as such
            result = Drop("bad_key")
        if isinstance(result, Drop):
            drops[result.reason] += 1
        else:
            samples.append(result)
    stats = {"written": len(samples), "dropped": dict(sorted(drops.items()))}
    if samples:
        write_tar(path, samples)
    else:  # no empty tar: a set of them looks like data and holds none
        Path(path).unlink(missing_ok=True)
    Path(str(path) + ".json").write_text(json.dumps(stats))
    return stats


def die_with_parent(parent: int) -> None:
    """Worker initializer: ask Linux to kill this process when its parent dies, so that a
    converter killed with ``--processes N`` leaves no N orphans writing on. Other systems have
    no such request: there the workers end when they next ask for work."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def check_source(
    out: Path, items: Sequence, source_id: Callable[[object], str], val_fraction: float
) -> None:
    """Record in ``out/source.json`` what the shards are converted from (the number of items,
    a digest of their source ids, the validation fraction that split them); refuse to resume
    into shards of another source, which would keep stale shards and under-report the
    summary."""
    digest = hashlib.sha256("\n".join(sorted(source_id(i) for i in items)).encode()).hexdigest()
    record = {"items": len(items), "source_ids_sha256": digest, "val_fraction": val_fraction}
    file = out / "source.json"
    if file.is_file():
        saved = json.loads(file.read_text())
        if saved != record:
            raise ValueError(
                f"{out} holds shards converted from another source or split ({saved} now "
                f"{record}): use an empty --out folder"
            )
    elif any(out.glob("*.tar")):
        raise ValueError(f"{out} holds shards of an unknown source: use an empty --out folder")
    file.write_text(json.dumps(record))


def convert_dataset(
    items: Sequence,
    source_id: Callable[[object], str],
    convert: Callable[[object], dict | Drop],
    out: str | os.PathLike,
    samples_per_shard: int | None = 1000,
    val_fraction: float = 0.05,
    processes: int = 1,
    desc: str = "converting",
    shard_bytes: int = 10**9,
) -> dict:
    """Convert ``items`` into shards under ``out``; returns (and saves) the summary.

    ``samples_per_shard=None`` sizes shards to about ``shard_bytes`` each. ``convert`` must be
    picklable (a module-level function or ``functools.partial``) when ``processes > 1``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_source(out, items, source_id, val_fraction)
    samples_per_shard = _layout(
        out, samples_per_shard, lambda: estimate_samples_per_shard(items, convert, shard_bytes)
    )
    by_split: dict[str, list] = {"train": [], "val": []}
    for item in items:
        by_split[split_of(source_id(item), val_fraction)].append(item)
    jobs, done = [], []
    for split, split_items in by_split.items():
        for k in range(0, len(split_items), samples_per_shard):
            path = out / f"{split}-{k // samples_per_shard:06d}.tar"
            stats_file = Path(str(path) + ".json")
            stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None
            if stats is not None and (path.is_file() or stats["written"] == 0):
                done.append((split, stats))
            else:
                jobs.append((split, (convert, split_items[k : k + samples_per_shard], path)))
    results = list(done)
    with tqdm(total=len(jobs) + len(done), initial=len(done), desc=desc, unit="shard") as bar:
        if processes > 1:
            with ProcessPoolExecutor(
                processes, initializer=die_with_parent, initargs=(os.getpid(),)
            ) as pool:
                for (split, _), stats in zip(
                    jobs, pool.map(_convert_shard, [j for _, j in jobs]), strict=True
                ):
                    results.append((split, stats))
                    bar.update()
        else:
            for split, job in jobs:
                results.append((split, _convert_shard(job)))
                bar.update()
    summary: dict = {
        "items": len(items),
        "samples_per_shard": samples_per_shard,
        "resumed_shards": len(done),
    }
    for split in by_split:
        dropped = Counter()
        for _, stats in (r for r in results if r[0] == split):
            dropped.update(stats["dropped"])
        summary[split] = {
            "shards": sum(1 for s, stats in results if s == split and stats["written"]),
            "written": sum(stats["written"] for s, stats in results if s == split),
            "dropped": dict(sorted(dropped.items())),
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def add_engine_arguments(parser: argparse.ArgumentParser, val_fraction: float = 0.05) -> None:
    """The command-line options every converter shares."""
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument(
        "--samples-per-shard", type=int, default=None, help="fixed samples per shard"
    )
    parser.add_argument(
        "--shard-size", type=parse_size, default="1GB",
        help="target shard size when --samples-per-shard is not given (default 1GB)",
    )  # fmt: skip
    parser.add_argument("--val-fraction", type=float, default=val_fraction)
    parser.add_argument("--processes", type=int, default=1)


def convert_from_args(items, source_id, convert, args: argparse.Namespace, desc: str) -> dict:
    """:func:`convert_dataset` with the shared options; prints and returns the summary."""
    try:
        summary = convert_dataset(
            items,
            source_id,
            convert,
            args.out,
            args.samples_per_shard,
            args.val_fraction,
            args.processes,
            desc=desc,
            shard_bytes=args.shard_size,
        )
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(json.dumps(summary, indent=2))
    if not any(summary[split]["written"] for split in ("train", "val")):
        dropped = Counter()
        for split in ("train", "val"):
            dropped.update(summary[split]["dropped"])
        raise SystemExit(
            f"nothing written to {args.out}: all {summary['items']} items were dropped "
            f"({dict(dropped)})"
        )
    return summary
