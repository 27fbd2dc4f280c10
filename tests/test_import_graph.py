"""No import cycles inside ``megatron/``, including imports hidden inside functions.

Every ``import megatron...`` and ``from megatron... import ...`` in every module is an edge, at
module level or inside a function, method or ``try`` block: a function-level import that closes a
cycle only moves the failure from import time to the first call (and hides the layering problem).
The one exception is an import under ``if TYPE_CHECKING:``; it is never executed (it exists for
annotations only), so it cannot take part in a cycle at run time.

How imports become edges (module ``M`` imports target ``T``):

* ``from megatron.x import y`` targets ``megatron.x.y`` when ``y`` is a submodule, else
  ``megatron.x`` (``y`` is a name defined, or re-exported, by ``megatron/x/__init__.py``).
* A package's ``__init__.py`` is the module ``megatron.x``.
* Importing ``T`` first runs the ``__init__.py`` of every package above ``T``, so ``M`` also
  depends on those packages -- except the ones containing ``M`` itself, which are already being
  imported when ``M`` runs. Naming one's own package explicitly (``import megatron.objectives``
  inside ``megatron/objectives/registry.py``) is an edge like any other: that ``__init__.py``
  imports modules that depend on ``M``. So a module using ``from megatron.config.sections import X`` depends
  on ``megatron/config/__init__.py`` and on everything that re-exports.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megatron"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _executed_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree`` except those in the body of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the ``else:`` branch does run
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, dict[str, int]]:
    """Module -> {imported module: line of the first import of it} over ``megatron/``."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in _executed_imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve_from(name, is_package, node)
                if base is None:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            own_packages = {name, *_ancestors(name)}
            for target in targets:
                if target not in modules:
                    continue
                edges.setdefault(target, node.lineno)  # named explicitly: always an edge
                for package in _ancestors(target):
                    if package in modules and package not in own_packages:
                        edges.setdefault(package, node.lineno)
        graph[name] = edges
    return graph


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in no particular order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_path(graph: dict[str, dict[str, int]], start: str, goal: str, within: set[str]):
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = [node]
            while previous[path[-1]] is not None:
                path.append(previous[path[-1]])
            return path[::-1]
        for child in sorted(graph[node]):
            if child in within and child not in previous:
                previous[child] = node
                queue.append(child)
    return None


def find_cycles(graph: dict[str, dict[str, int]]) -> list[str]:
    """One line per cycle: the shortest cycle through each edge of each strongly connected
    component (deduplicated), with the line of every import on it."""
    cycles: list[str] = []
    for component in _strongly_connected(graph):
        members = set(component)
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        seen: set[tuple[str, ...]] = set()
        for source in component:
            for target in sorted(graph[source]):
                if target not in members:
                    continue
                path = _shortest_path(graph, target, source, members)
                assert path is not None  # same component
                cycle = [source, *path] if source != target else [source, source]
                turn = cycle.index(min(cycle[:-1]))
                key = tuple(cycle[turn:-1] + cycle[:turn])
                if key in seen:
                    continue
                seen.add(key)
                ring = [*key, key[0]]
                steps = [f"{a} (line {graph[a][b]})" for a, b in zip(ring, ring[1:], strict=False)]
                cycles.append(" -> ".join([*steps, ring[-1]]))
    return sorted(cycles)


def test_graph_sees_function_level_and_reexport_edges():
    graph = import_graph()
    # a module-level edge, an edge to the package __init__ above the target
    assert "megatron.parallel.state" in graph["megatron.parallel.layers"]
    assert "megatron.parallel" in graph["megatron.model.transformer"]
    # a package's own __init__ importing its submodules
    assert "megatron.config.sections" in graph["megatron.config"]


def test_cycle_finder_reports_cycles():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"d": 4}, "e": {"a": 5}}
    assert find_cycles(graph) == [
        "a (line 1) -> b (line 2) -> c (line 3) -> a",
        "d (line 4) -> d",
    ]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in megatron/ (lines are the imports):\n" + "\n".join(cycles)
