"""The layering of docs/ARCHITECTURE.md ("Layers") holds in the code: every `gpu_workbench` import, at module
level or inside a function (a lazy import is still an arrow; only `if TYPE_CHECKING:` blocks are left out),
points down or within its own layer, and no group of modules imports itself round a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gpu_workbench"
# bottom up; a layer may import its own modules and those of the layers below it
LAYERS = {"kernels": 0, "profiling": 0, "parallel": 1, "cluster": 2, "cli": 3}
# inside parallel/, bottom up; modules of one level may import each other (config names the model registry,
# the model reads its config); the package's __init__ is the facade on top
PARALLEL_LAYERS = {"runtime": 0, "models": 1, "config": 1, "data": 2, "checkpoint": 2, "primitives": 3,
                   "recipes": 4, "loop": 5, "tools": 6}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _known(name: str) -> str | None:
    """The project module `name` is, or the one it lives in (an imported function or class)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> set[str]:
    """The project modules `module` imports (what `from X import name` names, where name is a module)."""
    path = MODULES[module]
    found: set[str | None] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text())]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(_known(a.name) for a in node.names if a.name.startswith("gpu_workbench"))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, path.name == "__init__.py")
            if base.startswith("gpu_workbench"):
                found.update(_known(f"{base}.{a.name}") for a in node.names)
        pending.extend(ast.iter_child_nodes(node))
    found.discard(None)
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_parser_sees_the_imports():
    """The checks below mean something only if the graph is real: known arrows are found."""
    assert len(MODULES) > 80
    assert "gpu_workbench.parallel.primitives.parallelize" in GRAPH["gpu_workbench.parallel.recipes.ddp"]
    assert "gpu_workbench.kernels" in GRAPH["gpu_workbench.parallel.models.transformer"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("top", sorted(LAYERS))
def test_arrows_point_down(top):
    up = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() if layer(m) == LAYERS[top] and m.split(".")[1] == top
                for d in deps if layer(d) is not None and d.split(".")[1] != top and layer(d) >= LAYERS[top])
    assert up == [], "imports that point up or sideways between layers:\n" + "\n".join(up)


def parallel_layer(module: str) -> int | None:
    parts = module.split(".")
    return PARALLEL_LAYERS.get(parts[2]) if parts[:2] == ["gpu_workbench", "parallel"] and len(parts) > 2 else None


def test_every_parallel_module_has_a_layer():
    stray = [m for m in MODULES if m.startswith("gpu_workbench.parallel.") and parallel_layer(m) is None]
    assert stray == [], f"modules of parallel/ in no layer of PARALLEL_LAYERS: {stray}"


def test_arrows_point_down_inside_parallel():
    up = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() if parallel_layer(m) is not None
                for d in deps if parallel_layer(d) is not None and parallel_layer(d) > parallel_layer(m))
    assert up == [], "imports that point up between the layers of parallel/:\n" + "\n".join(up)


def test_no_import_circles():
    assert circles(GRAPH) == []
