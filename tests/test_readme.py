"""The README's commands work as written on a fresh clone: every ``python -m`` runs in the
project's environment and names a module that exists, every ``make`` target exists, and the
cheap ones run."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_commands_use_the_project_environment():
    bare = re.findall(r"(?<![\w/.])python3? -m [\w.]+", README)
    assert not bare, f"give these as .venv/bin/python -m ...: {bare}"


def test_every_python_module_in_the_readme_exists():
    modules = set(re.findall(r"(?:\.venv/bin/python|torchrun[^\n]*?) -m ([a-zA-Z_][\w.]*)", README))
    assert "experiments.run" in modules
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, missing


def test_every_make_target_in_the_readme_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-zA-Z][\w-]*):", makefile, re.MULTILINE))
    used = set(re.findall(r"\bmake ([a-z][\w-]*)", README))
    assert used and not used - targets, sorted(used - targets)


def test_the_documented_print_command_runs():
    command = ".venv/bin/python -m experiments.run print experiments/hand/tiny.yaml"
    assert command in README
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "print", "experiments/hand/tiny.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "target:" in out.stdout
