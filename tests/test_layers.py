"""The package's layer order (ARCHITECTURE.md, Layers), read from the imports of every module.

A module may import only from its own layer or below, and no set of modules imports itself round
in a circle. Imports anywhere in a module count (top level, inside functions, under
``TYPE_CHECKING``): a lazy import is still a dependency. The one exception is the package's own
``__init__``: its facade functions ``mmsphere.load`` / ``mmsphere.train`` import lazily so that
``import mmsphere`` stays light, and every other module may read ``mmsphere.__version__`` from it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmsphere"

# lowest first; a package's `cli.py` modules are the top layer whatever package they sit in
LAYERS: dict[str, int] = {
    "mmsphere": 0, "errors": 0, "atomic": 0, "console": 0, "user_modules": 0, "plotting": 0,
    "config": 0, "cli_errors": 0, "registry": 0, "digest": 0,
    "losses": 1, "data": 1, "models": 1,
    "weighting": 2, "cache": 2,
    "train": 3, "eval": 3, "ood": 3, "results": 3,
    "ablation": 4, "demo": 4,
    "cli": 5,
}
TOP = max(LAYERS.values())


def module_name(path: Path) -> str:
    """Dotted module name of a file under the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, name: str) -> set[str]:
    """Every mmsphere module ``path`` imports (absolute or relative, at any depth of the file)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = ast.walk(tree)
    if name == "mmsphere":  # the facade: only its top-level statements count
        nodes = (node for statement in tree.body if not isinstance(statement, ast.FunctionDef)
                 for node in ast.walk(statement))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            # `from mmsphere.x import y` may name a submodule y
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in found if module == "mmsphere" or module.startswith("mmsphere.")}


def layer(module: str) -> int:
    """The layer of a dotted module name."""
    parts = module.split(".")
    if parts[-1] == "cli":
        return TOP
    top = parts[1] if len(parts) > 1 else "mmsphere"
    if top not in LAYERS:
        raise AssertionError(f"{module}: package {top!r} has no layer; add it to LAYERS and ARCHITECTURE.md")
    return LAYERS[top]


def import_graph() -> dict[str, set[str]]:
    """Module → the existing mmsphere modules it imports."""
    files = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    return {name: {module for module in imported_modules(path, name) if module in files and module != name}
            for name, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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


def test_no_module_imports_above_its_layer():
    upward = [f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
              for module, targets in import_graph().items() for target in sorted(targets)
              if layer(target) > layer(module)]
    assert not upward, "imports above their layer:\n" + "\n".join(upward)


def test_import_graph_has_no_circle():
    assert circles(import_graph()) == []


def test_every_package_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer(module_name(path))


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, []),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
])
def test_circle_finder_against_hand_made_graphs(graph, expected):
    assert sorted(circles(graph)) == expected


def test_relative_and_lazy_imports_are_read(tmp_path):
    package = tmp_path / "mmsphere" / "losses"
    package.mkdir(parents=True)
    source = package / "terms.py"
    source.write_text("from . import functional\nfrom ..config import x\n"
                      "def f():\n    from mmsphere.train import loop\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "mmsphere"
    try:
        found = imported_modules(source, module_name(source))
    finally:
        PACKAGE = saved
    assert {"mmsphere.losses.functional", "mmsphere.config", "mmsphere.train", "mmsphere.train.loop"} <= found
