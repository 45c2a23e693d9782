"""Import layers, read from the source (every import, those inside functions included): the
workers never import the gateway (``latentsieve.service``), and the gateway's modules import
each other without a cycle (``service/errors.py`` and ``service/schemas.py`` had one, hidden by
an import inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules(folder: str) -> dict[str, Path]:
    """``latentsieve.<folder>.<module>`` -> its file."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        found[".".join(("latentsieve", folder, *parts)).removesuffix(".__init__")] = path
    return found


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, and every ``module.name`` it imports from one."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_workers_never_import_the_gateway() -> None:
    for name, path in modules("workers").items():
        gateway = sorted(n for n in imported(path) if n.startswith("latentsieve.service"))
        assert not gateway, f"{name} imports {gateway}"


def test_the_gateway_modules_import_each_other_without_a_cycle() -> None:
    service = modules("service")
    graph = {name: imported(path) & set(service) - {name} for name, path in service.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert graph["latentsieve.service.schemas"] >= {"latentsieve.service.errors"}
    assert "latentsieve.service.schemas" not in graph["latentsieve.service.errors"]
