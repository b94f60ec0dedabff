"""Imports inside ``unet_surgery`` go one way: no module reaches itself through its imports.

An AST walk over every module (imports inside functions included, ``if TYPE_CHECKING:``
blocks left out: they never run). ``from a.b import c`` is an edge to ``a.b.c`` when that is a
module, else to ``a.b``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

import unet_surgery
from unet_surgery._version import __version__

PACKAGE = Path(unet_surgery.__file__).parent


def module_files() -> dict[str, Path]:
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = file
    return out


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, file in modules.items():
        tree = ast.parse(file.read_text())
        type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[name].add(sub if sub in modules else node.module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_walk_sees_a_cycle_when_there_is_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_the_package() -> None:
    graph = import_graph()
    assert "unet_surgery.core.registry" in graph["unet_surgery.recipes.schema"]  # the walk sees edges
    assert cycles(graph) == []


def is_builder(name: str) -> bool:
    """A pass folder's recipe builder (``passes/<pass>/builder.py``): it sits above ``recipes/``."""
    return name.startswith("unet_surgery.passes.") and name.endswith(".builder")


def test_layers_import_downwards_only() -> None:
    """core imports neither passes nor recipes; passes do not import recipes, except a pass's builder.

    A builder sits above ``recipes/`` (it makes a ``Recipe`` with the parser's helpers), so no
    module of ``passes/``, ``core/`` or the recipe parser imports one.
    """
    graph = import_graph()
    builders = {name for name in graph if is_builder(name)}
    assert "unet_surgery.passes.fouriscale.builder" in builders  # the rule sees the folder-per-pass builders
    for name, targets in graph.items():
        if name.startswith("unet_surgery.core"):
            assert not {t for t in targets if t.startswith(("unet_surgery.passes", "unet_surgery.recipes"))}, name
        if name.startswith("unet_surgery.passes") and not is_builder(name):
            assert not {t for t in targets if t.startswith("unet_surgery.recipes") or is_builder(t)}, name
        if name in ("unet_surgery.recipes.schema", "unet_surgery.recipes.library"):
            assert not targets & builders, name


def test_version_is_the_packaged_one() -> None:
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    assert __version__ == project["version"] == unet_surgery.__version__
