"""The shape of the package: nothing outside the estimator reaches into it, and the library never loads the harness.

The direction of imports (the layers of docs/architecture.md) is import-linter's contract in
pyproject.toml, checked by ``lint-imports`` in the test command.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

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


def test_no_two_modules_share_a_name():
    # One concept, one place: a name says what a module holds, so two modules of one name hold two halves of one thing.
    stems = [p.stem for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert sorted({s for s in stems if stems.count(s) > 1}) == []


def test_the_module_table_matches_the_tree():
    # docs/architecture.md lists each module of the wings by its path; sub-packages that hold one
    # module per item (tower families, bench methods, dataset readers) are listed as folders.
    listed_as_folder = ("bench/", "model/towers/", "standin/")
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = {m for m in re.findall(r"^\| `([\w/]+\.py)` \|", doc, flags=re.M)}
    tree = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py", "_version.py")
        and not str(p.relative_to(PACKAGE)).startswith(listed_as_folder)
    }
    assert table == tree


def _run(code: str) -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_the_library_loads_only_what_is_asked_for():
    # A fresh interpreter: `import prolip` loads its table of names and nothing heavy; the adapter loads its own
    # modules, never a variant or the benchmark harness (prolip.bench, behind the `bench` command).
    out = _run(
        "import sys; import prolip; print(sorted(m for m in sys.modules if m.startswith('prolip')), 'torch' in sys.modules);"
        "from prolip import ProLIPAdapter; print(sorted(m for m in sys.modules if m.startswith(('prolip.bench', 'prolip.variants'))))"
    )
    first, second = out.splitlines()
    assert first == "['prolip', 'prolip._version'] False"
    assert second == "[]"


def test_the_public_table_names_every_public_name_once():
    import ast

    import prolip

    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    typed = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for child in node.body
        for alias in child.names
    }
    assert set(prolip.__all__) == set(prolip._PUBLIC) | {"__version__"} == typed | {"__version__"}
    for name in prolip.__all__:
        assert getattr(prolip, name) is not None
    assert "ProLIPAdapter" in dir(prolip)


def test_the_command_line_imports_the_harness_only_for_the_bench_command():
    import ast

    tree = ast.parse((PACKAGE / "cli.py").read_text())
    importers = {
        function.name
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prolip.bench")
    }
    top_level = [n for n in tree.body if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("prolip.bench")]
    assert importers == {"_bench"} and top_level == []


@pytest.mark.slow
def test_the_docs_gate_fails_on_a_broken_link(tmp_path):
    """scripts/test.sh builds the docs strictly, and without --quiet (which hid the warnings strict mode counts):
    a deliberately broken link in a copy of the docs fails that build."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    command = next(line for line in (root / "scripts" / "test.sh").read_text().splitlines() if "mkdocs build" in line)
    assert "--strict" in command and "--quiet" not in command.split("#")[0]
    shutil.copytree(root / "docs", tmp_path / "docs")
    shutil.copy(root / "mkdocs.yml", tmp_path / "mkdocs.yml")
    index = (tmp_path / "docs" / "index.md").read_text()
    env = {**os.environ, "PYTHONPATH": str(root)}
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml"), "-d",
             str(tmp_path / "site")]  # fmt: skip
    # A missing page, and a missing heading of a page that exists (mkdocs only notes those unless told to warn).
    for broken in ("no-such-page.md", "datasets.md#no-such-heading"):
        (tmp_path / "docs" / "index.md").write_text(f"{index}\n[a link to nothing]({broken})\n")
        done = subprocess.run(build, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert done.returncode != 0 and broken.split("#")[-1] in done.stdout + done.stderr, done.stderr[-2000:]
