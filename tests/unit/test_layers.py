"""The layer rule, read from the imports: formats < core < adapters < service < cli, workers and testing beside.

Every ``import`` and ``from ... import`` in every module under oddaemon/ counts, wherever it is:
at the top, inside a function, under ``if TYPE_CHECKING:``. A module may import its own layer or a
lower one, never a higher one; workers may import only formats, core and workers; testing, the root
package and ``oddaemon/__main__.py`` (the top) may import anything. The root package is the parent of
every module (its ``__version__`` is the one constant all share), so any module may import it; no
module may import ``__main__``. The module graph has no cycle.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "oddaemon"
LAYERS = {"formats": 0, "core": 1, "adapters": 2, "service": 3, "cli": 4}
WORKERS_MAY_IMPORT = {"formats", "core", "workers"}
TOP = {"oddaemon", "oddaemon.__main__"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a package's __init__ is the package's name)
    where: str  # file:line


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module ``name`` loads: itself, else its nearest enclosing module (``a.b.func`` -> ``a.b``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, known: dict[str, Path], root: Path = REPO) -> list[Import]:
    """Every oddaemon module ``name`` imports, relative imports resolved, each with its file:line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` loads the submodule pkg.sub; ``from mod import name`` loads mod
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                       for alias in node.names]
        for target in targets:
            if target == "oddaemon" or target.startswith("oddaemon."):
                resolved = _resolve(target, known)
                if resolved is not None and resolved != name:
                    found.append(Import(name, resolved, f"{path.relative_to(root)}:{node.lineno}"))
    return found


def all_imports() -> list[Import]:
    known = modules()
    return [imp for name, path in known.items() for imp in imports_of(name, path, known)]


def package_of(module: str) -> str:
    """'core' for oddaemon.core.jobs; the module itself for the top (oddaemon, oddaemon.__main__)."""
    return module if module in TOP else module.split(".")[1]


def breaks_the_rule(imp: Import) -> str | None:
    """Why this import breaks the layer rule, or None when it is allowed."""
    source, target = package_of(imp.source), package_of(imp.target)
    if imp.target == "oddaemon.__main__":
        return "imports oddaemon/__main__.py, which no module may import"
    if source in TOP or source == "testing" or imp.target == "oddaemon":
        return None
    if source == "workers":
        return None if target in WORKERS_MAY_IMPORT else f"workers may import only {sorted(WORKERS_MAY_IMPORT)}"
    if target not in LAYERS:
        return f"{source} may not import {target} (only testing and the top may)"
    if LAYERS[target] > LAYERS[source]:
        return f"{source} (layer {LAYERS[source]}) imports the higher layer {target} (layer {LAYERS[target]})"
    return None


def test_import_collection_sees_function_level_type_checking_and_relative_imports(tmp_path):
    pkg = tmp_path / "oddaemon" / "core"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from oddaemon.cli import x\n"
                              "def f():\n    from . import b\n    import oddaemon.core.b.thing\n")
    known = {"oddaemon": Path(), "oddaemon.core": Path(), "oddaemon.core.b": Path(), "oddaemon.cli": Path(),
             "oddaemon.cli.x": Path()}
    found = imports_of("oddaemon.core.a", pkg / "a.py", known, root=tmp_path)
    assert [(i.target, i.where) for i in found] == [
        ("oddaemon.cli.x", "oddaemon/core/a.py:3"), ("oddaemon.core.b", "oddaemon/core/a.py:5"),
        ("oddaemon.core.b", "oddaemon/core/a.py:6")]
    assert breaks_the_rule(found[0]) == "core (layer 1) imports the higher layer cli (layer 4)"
    assert breaks_the_rule(found[1]) is None


def test_no_module_imports_a_higher_layer():
    broken = [f"{imp.where}: {imp.source} imports {imp.target}: {why}"
              for imp in all_imports() if (why := breaks_the_rule(imp))]
    assert not broken, "imports against the layer rule:\n" + "\n".join(broken)


def _cycles(edges: dict[str, dict[str, Import]]) -> list[list[Import]]:
    """One cycle (as its imports, in order) for each strongly connected component larger than one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(node: str) -> None:  # Tarjan, iterative over each node's successors
        work = [(node, iter(sorted(edges.get(node, {}))))]
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        while work:
            current, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, {})))))
                    break
                if nxt in on_stack:
                    low[current] = min(low[current], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[current])
                if low[current] == index[current]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == current:
                            break
                    components.append(component)

    for node in sorted(edges):
        if node not in index:
            strongconnect(node)
    cycles: list[list[Import]] = []
    for component in components:
        if len(component) < 2:
            continue
        for start in sorted(component):  # a shortest cycle through each member, each cycle once
            cycle = _shortest_cycle(edges, component, start)
            if not any(set(cycle) == set(seen) for seen in cycles):
                cycles.append(cycle)
    return cycles


def _shortest_cycle(edges: dict[str, dict[str, Import]], component: set[str], start: str) -> list[Import]:
    """The imports of a shortest way from ``start`` back to itself inside ``component`` (breadth first)."""
    came_from: dict[str, Import] = {}
    frontier = [start]
    while frontier and start not in came_from:
        following = []
        for node in frontier:
            for nxt, imp in sorted(edges.get(node, {}).items()):
                if nxt in component and nxt not in came_from:
                    came_from[nxt] = imp
                    following.append(nxt)
        frontier = following
    path, node = [], start
    while True:
        imp = came_from[node]
        path.append(imp)
        node = imp.source
        if node == start:
            return path[::-1]


def test_cycle_finder_reports_each_cycle_with_its_imports():
    def imp(a, b):
        return Import(a, b, f"{a}.py:1")
    edges = {"a": {"b": imp("a", "b")}, "b": {"c": imp("b", "c")}, "c": {"a": imp("c", "a"), "d": imp("c", "d")},
             "d": {}, "x": {"y": imp("x", "y")}, "y": {"x": imp("y", "x")}}
    def members(cycles):
        for cycle in cycles:  # each import leads to the next, the last back to the first
            assert [i.target for i in cycle] == [i.source for i in cycle[1:] + cycle[:1]]
        return sorted(sorted(i.source for i in cycle) for cycle in cycles)
    assert members(_cycles(edges)) == [["a", "b", "c"], ["x", "y"]]
    edges["b"]["a"] = imp("b", "a")  # a second cycle in the same component is reported too
    assert members(_cycles(edges)) == [["a", "b"], ["a", "b", "c"], ["x", "y"]]


def test_the_module_graph_has_no_cycle():
    edges: dict[str, dict[str, Import]] = {}
    for imp in all_imports():
        edges.setdefault(imp.source, {}).setdefault(imp.target, imp)
    shown = [" -> ".join([cycle[0].source] + [f"{i.target} ({i.where})" for i in cycle]) for cycle in _cycles(edges)]
    assert not shown, "import cycles:\n" + "\n".join(shown)


WHAT_MAY_BE_IMPORTED = {  # the words each package's docstring must have for what it may import
    "formats": [r"imports? nothing"],
    "core": [r"\bformats\b"],
    "adapters": [r"\bcore\b", r"\bformats\b"],
    "service": [r"\badapters\b", r"\bcore\b", r"\bformats\b"],
    "cli": [r"\beverything\b|\bservice\b.*\badapters\b.*\bcore\b.*\bformats\b"],
    "workers": [r"\bcore\b", r"\bformats\b"],
    "testing": [r"\banything\b|\beverything\b"],
}


def test_every_package_says_what_it_may_import():
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == sorted(WHAT_MAY_BE_IMPORTED), "a package was added or removed: say what it may import here"
    missing = []
    for name in packages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text(encoding="utf-8"))) or ""
        flat = " ".join(doc.split())
        if not re.search(r"\bimports?\b", flat, re.I) or not all(re.search(w, flat, re.I | re.S)
                                                                  for w in WHAT_MAY_BE_IMPORTED[name]):
            missing.append(f"oddaemon/{name}/__init__.py: its docstring should say what it may import "
                           f"({WHAT_MAY_BE_IMPORTED[name]}): {flat[:200]!r}")
    assert not missing, "\n".join(missing)
