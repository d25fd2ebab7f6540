"""The shape of the package: imports run one way, and nothing outside the estimator reaches into it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prolip"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every prolip module and the prolip modules it imports, at top level or inside functions."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prolip"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("prolip")]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_imports_have_no_cycle():
    graph = _imports()
    # A package's __init__ re-exports its modules: edges into it stand for edges into them.
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "active"
        for nxt in sorted(graph[node]):
            if nxt == "prolip" or (nxt.count(".") == 1 and (PACKAGE / nxt.split(".")[1] / "__init__.py").exists()):
                continue  # a package's own namespace
            assert state.get(nxt) != "active", f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


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


def test_hub_never_sees_an_estimator():
    assert "prolip.adapter" not in _imports()["prolip.hub"]


def test_the_estimator_stays_thin():
    assert len((PACKAGE / "adapter.py").read_text().splitlines()) < 400
