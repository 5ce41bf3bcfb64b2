"""The package layout is the architecture: layers in folders, imports that point one way.

Every ``import`` of a project module is counted, inside functions too; only
imports under ``if TYPE_CHECKING:`` (annotations, never run) are left out.
A lower layer may not import a higher one, and no two project modules may
import each other through any chain (no circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_diffcut"
PKG = "napari_diffcut"

#: Layer of each top-level folder (or module), in the order data flows.
#: A module may import modules of its own layer or of lower layers only.
LAYERS: dict[str, int] = {
    "core": 0,  # numpy/scipy: image, walk, NCut, tree, pixel labels
    "attention": 1,  # torch/diffusers: model loading, capture, diffusion
    "accel": 1,  # torch: the post-model stages on the model's device
    "files": 1,  # bytes on disk: images, labels, the result store format
    "pipeline": 2,  # per plane: settings, diffuse -> walk -> cut -> labels
    "results": 3,  # reopened results, editing, export
    "large": 3,  # tiles, stacks, lazy inputs; the dispatching engine API
    "plugin": 4,  # napari front end
    "batch": 4,  # batch runner (local or Dask)
    "evaluation": 4,  # benchmarks harness
    "cli": 5,  # the command line (registers the batch and evaluate commands)
    "testing": 5,  # fixtures for tests and benchmarks
    "__init__": 6,  # the lazy public API
    "__main__": 6,
}
MAX_LINES = 520


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, known: set[str]) -> list[tuple[str, int, list[str]]]:
    """(imported project module, line, imported names) for every runtime import."""
    found: list[tuple[str, int, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PKG:
                    found.append((alias.name, node.lineno, []))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == PKG
        ):
            names = [a.name for a in node.names]
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in known]
            found.extend((m, node.lineno, []) for m in subs)
            rest = [n for n in names if f"{node.module}.{n}" not in known]
            if rest:
                found.append((node.module, node.lineno, rest))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    assert key in LAYERS, f"{module} is in no layer: add its folder to LAYERS"
    return LAYERS[key]


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = {m for m, _, _ in _imports(path, known) if m in known and m != name}
        # Importing a package runs its __init__: count it as an edge to it.
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in ``graph`` (as a path) or None (iterative DFS)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        state[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph.get(nxt, ()))))
    return None


def test_every_module_is_in_a_layer() -> None:
    for name in _modules():
        _layer(name)


def test_no_import_points_up() -> None:
    mods = _modules()
    known = set(mods)
    bad = []
    for name, path in mods.items():
        if name == PKG:
            continue  # the lazy public API re-exports from every layer
        for dep, line, _ in _imports(path, known):
            if dep == PKG:
                bad.append(f"{path.relative_to(SRC)}:{line} imports the package root")
            elif dep in known and _layer(dep) > _layer(name):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {dep} (a higher layer)")
    assert not bad, "\n".join(bad)


def test_no_import_circle() -> None:
    graph = _graph()
    graph.pop(PKG, None)
    for deps in graph.values():
        deps.discard(PKG)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_a_circle() -> None:
    circle = _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    assert circle is not None and circle[0] == circle[-1] and len(circle) == 4
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_name_crosses_modules() -> None:
    mods = _modules()
    known = set(mods)
    bad = []
    for name, path in mods.items():
        for dep, line, names in _imports(path, known):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and dep != name:
                bad.append(f"{path.relative_to(SRC)}:{line} imports {private} from {dep}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_modules_stay_small(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines (limit {MAX_LINES})"


def test_tests_mirror_the_package() -> None:
    tests = Path(__file__).resolve().parent
    for folder in ("core", "attention", "pipeline", "large", "files", "results", "plugin",
                   "cli", "batch", "evaluation"):
        assert (SRC / folder).is_dir()
        assert (tests / folder).is_dir(), f"tests/{folder}/ missing"
