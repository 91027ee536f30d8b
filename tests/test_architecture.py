"""The house's floors: no stage imports the composer or a face, and top-level packages form no cycle.

Reads every import of ``src/vprkit`` with ``ast`` (function-local and ``TYPE_CHECKING`` imports
included, since those are how cycles used to be hidden), maps each to its top-level unit
(``vprkit.rerank.patches`` → ``rerank``) and checks the direction.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import vprkit

SRC = Path(vprkit.__file__).resolve().parent
# Composer and faces: they may import anything; nothing below them may import them.
TOP_FLOORS = {"pipeline", "cli", "service"}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "vprkit" else None


def import_edges(src: Path = SRC) -> dict[tuple[str, str], str]:
    """(importing unit, imported unit) → first place it happens (``file:line``)."""
    edges: dict[tuple[str, str], str] = {}
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src.parent).with_suffix("")
        is_init = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_init else rel.parts)
        me = _unit(module)
        if me is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = module.split(".")[: len(module.split(".")) - node.level + (1 if is_init else 0)]
                    base = ".".join(package + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                unit = _unit(target)
                if unit and unit != me:
                    edges.setdefault((me, unit), f"{path.relative_to(src.parent)}:{node.lineno}")
    return edges


def _cycles(edges) -> list[list[str]]:
    graph = defaultdict(set)
    for a, b in edges:
        if a not in TOP_FLOORS and b not in TOP_FLOORS:
            graph[a].add(b)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_stage_imports_the_composer_or_a_face():
    upward = {f"{a} imports {b} ({where})" for (a, b), where in import_edges().items() if b in TOP_FLOORS and a not in TOP_FLOORS}
    assert not upward, sorted(upward)


def test_top_level_packages_form_no_import_cycle():
    assert _cycles(import_edges()) == []


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "vprkit"
    (pkg / "rerank").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "rerank" / "__init__.py").write_text("")
    (pkg / "rerank" / "x.py").write_text("def f():\n    from ..pipeline import Map\n    from .. import retrieval\n")
    (pkg / "retrieval.py").write_text("from .rerank import x\n")
    edges = import_edges(pkg)
    assert ("rerank", "pipeline") in edges and ("rerank", "retrieval") in edges and ("retrieval", "rerank") in edges
    assert _cycles(edges) == [["rerank", "retrieval"]]
