"""The layers import downwards only: a method does not know how it is launched."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> packages it must not import
FORBIDDEN = {
    "lightning_modules": ("experiments",),
    "metrics": ("experiments", "lightning_modules", "datamodules"),
    "datamodules": ("experiments", "lightning_modules", "metrics"),
    # the estimators the annotator and the metrics share import neither
    "pose_estimation": ("experiments", "lightning_modules", "metrics", "datamodules"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_no_layer_above_it(package):
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).glob("*.py"))
        for name in _imports(path) & set(FORBIDDEN[package])
    }
    assert not offenders, sorted(offenders)
