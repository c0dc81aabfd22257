"""The code's floors hold: core (`curate/`) → `builders/`, `train/` → the CLI (`curate/commands/`, `curate/cli.py`).

Computed from the source with `ast`, so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("curate", "builders", "train")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _floor(module: str) -> int:
    if module == "curate.cli" or module.startswith("curate.commands"):
        return 3
    return 2 if module.split(".")[0] in ("builders", "train") else 1


def _edges(modules: dict[str, Path]) -> set[tuple[str, str]]:
    edges = set()
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            edges |= {(name, t) for t in targets if t in modules and t != name}
    return edges


def test_no_import_points_up_a_floor() -> None:
    modules = _modules()
    upward = sorted((a, b) for a, b in _edges(modules) if _floor(b) > _floor(a))
    assert upward == []


def test_no_import_circle() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for a, b in _edges(modules):
        graph[a].add(b)
    # A package's __init__ re-exporting its own submodules is not a circle between rooms.
    for a in list(graph):
        graph[a] = {b for b in graph[a] if not (b.startswith(a + ".") and a in modules)}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            assert (cycle := visit(m)) is None, " -> ".join(cycle)
