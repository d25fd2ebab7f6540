"""The shape of the package: nothing outside the estimator reaches into it, and the estimator stays thin.

The direction of imports (the layers of docs/architecture.md) is import-linter's contract in
pyproject.toml, checked by ``lint-imports`` in the test command.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prolip"


def test_the_estimator_is_used_from_outside_only_through_public_names():
    private = re.compile(r"\b(adapter|base|ad|est|estimator|self\.adapter|self\.base)\._[a-z]")
    offenders = []
    for folder in ("prolip", "examples", "benchmarks", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == PACKAGE / "adapter.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if private.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_estimator_stays_thin():
    assert len((PACKAGE / "adapter.py").read_text().splitlines()) < 400


def test_every_module_sits_in_a_declared_layer():
    # lint-imports checks only the modules its layers name: a new top-level module outside them
    # would escape the layering unnoticed.
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    declared = {name.strip() for layer in layers for name in layer.split("|")}
    top = {f"prolip.{p.stem}" for p in PACKAGE.glob("*.py")} | {
        f"prolip.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()
    }
    assert top - {"prolip.__init__", "prolip.__main__"} == declared


def test_the_module_table_matches_the_tree():
    # docs/architecture.md lists each module of the wings by its path; sub-packages that hold one
    # module per item (tower families, bench methods, dataset readers) are listed as folders.
    listed_as_folder = ("bench/", "datasets/", "model/towers/", "standin/")
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = {m for m in re.findall(r"^\| `([\w/]+\.py)` \|", doc, flags=re.M)}
    tree = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py", "_version.py")
        and not str(p.relative_to(PACKAGE)).startswith(listed_as_folder)
    }
    assert table == tree
