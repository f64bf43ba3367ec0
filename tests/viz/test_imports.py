"""labcore (and so labcore.viz) has no import cycles: the package-internal import graph (every import statement,
top-level or inside a function) has no cycle through a viz module."""

from __future__ import annotations

import ast
from pathlib import Path

import labcore

PKG = Path(labcore.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for dep in graph[node]:
            if dep == start:
                return path + [start]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, path + [dep]))
    return None


def test_graph_sees_known_edges():
    g = _graph()
    assert "labcore.viz.tour" in g["labcore.viz.tour_plots"]          # the walker finds real imports
    assert "labcore.viz.report" in g["labcore.cli"]                   # including ones inside functions


def test_no_import_cycle_through_viz():
    g = _graph()
    viz = sorted(m for m in g if m.startswith("labcore.viz"))
    assert len(viz) >= 9
    cycles = {m: c for m in viz if (c := _cycle_through(g, m))}
    assert cycles == {}


def test_no_import_cycle_anywhere_in_labcore():
    g = _graph()
    assert len(g) > 60
    cycles = {m: c for m in sorted(g) if (c := _cycle_through(g, m))}
    assert cycles == {}
