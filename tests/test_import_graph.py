"""The package's shape: no import circle among grcm's modules, no oversized module.

The import graph is read from the sources with ``ast`` (nothing is imported): every ``import`` /
``from ... import`` statement counts, at module level, under ``if TYPE_CHECKING:`` or inside a
function, because a function-level import is still a dependency of the importing module.
``from grcm.a import b`` points at the module ``grcm.a.b`` when that module exists, else at ``grcm.a``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "grcm"
MAX_LINES = 450


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under the package folder ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of ``modules`` (None outside the package)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (self-imports dropped)."""
    modules = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: strip (level - 1) parts from this module's package
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join([*package, base] if base else package)
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            targets.update(filter(None, (_resolve(name, modules) for name in names)))
        targets.discard(module)
        graph[module] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A concrete path ``start -> ... -> start`` inside one strongly connected component (breadth-first)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if target not in parents:
                    parents[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")  # unreachable for an SCC


def test_no_import_cycle_among_grcm_modules():
    graph = import_graph(PACKAGE_ROOT)
    assert "grcm.cli" in graph and "grcm.rerank.two_stage" in graph  # the walk saw the package
    cycles = import_cycles(graph)
    assert not cycles, "import circles among grcm modules (move the shared piece to its own module):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def _write(root: Path, files: dict[str, str]) -> None:
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(source)


def test_cycle_finder_sees_function_level_relative_and_long_circles(tmp_path):
    """The checker itself: a circle through a function-level import, a relative one and a 3-module one."""
    root = tmp_path / "pkg"
    _write(
        root,
        {
            "__init__.py": "",
            "a.py": "def f():\n    from pkg.b import g\n",
            "b.py": "import pkg.a\n",
            "sub/__init__.py": "from .c import h\n",
            "sub/c.py": "from pkg.sub import d\n",
            "sub/d.py": "from ..e import x\n",
            "e.py": "from pkg.sub.c import h\nimport os\n",
            "leaf.py": "from pkg import a, e\n",
        },
    )
    graph = import_graph(root)
    assert graph["pkg.leaf"] == {"pkg.a", "pkg.e"}
    assert graph["pkg.sub"] == {"pkg.sub.c"}
    assert graph["pkg.sub.d"] == {"pkg.e"}
    cycles = sorted(import_cycles(graph))
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.e", "pkg.sub.c", "pkg.sub.d", "pkg.e"]]


def test_cycle_finder_passes_a_tree(tmp_path):
    root = tmp_path / "pkg"
    _write(root, {"__init__.py": "", "a.py": "from pkg.b import g\n", "b.py": "import pkg.c\n", "c.py": ""})
    assert import_cycles(import_graph(root)) == []


def test_no_grcm_module_exceeds_the_line_limit():
    lengths = {path: len(path.read_text().splitlines()) for path in module_files(PACKAGE_ROOT).values()}
    too_long = {str(path.relative_to(PACKAGE_ROOT.parent)): n for path, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concept): {too_long}"
