"""Library modules never import from a command-line module (issue 13): scripts are thin, the library is whole."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import mmsphere


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name, with its source file (packages by their ``__init__.py``)."""
    modules = {"mmsphere": Path(mmsphere.__file__)}
    for info in pkgutil.walk_packages(mmsphere.__path__, prefix="mmsphere."):
        folder = Path(info.module_finder.path)
        leaf = info.name.rsplit(".", 1)[-1]
        modules[info.name] = folder / leaf / "__init__.py" if info.ispkg else folder / f"{leaf}.py"
    return modules


def imported_modules(name: str, path: Path) -> set[str]:
    """Dotted names of everything ``path`` imports, anywhere in it (inside functions too), relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([base] if base else [])])
            found.add(base)
            # `from mmsphere.ood import cli` imports the module mmsphere.ood.cli
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def is_cli(name: str) -> bool:
    return name == "cli" or name.endswith(".cli")


def test_the_walk_sees_the_command_line_and_library_modules():
    modules = package_modules()
    assert {"mmsphere.cli", "mmsphere.eval.cli", "mmsphere.ood.cli", "mmsphere.ood.evaluate",
            "mmsphere.ablation", "mmsphere.ablation.cli"} <= set(modules)
    assert all(path.is_file() for path in modules.values())


def test_no_library_module_imports_a_command_line_module():
    offenders = {
        name: sorted(imported for imported in imported_modules(name, path)
                     if imported.startswith("mmsphere") and is_cli(imported))
        for name, path in package_modules().items() if not is_cli(name)
    }
    offenders = {name: imports for name, imports in offenders.items() if imports}
    assert not offenders, f"library modules import from CLI modules (move the code out of the cli.py): {offenders}"


def test_the_check_catches_every_import_form(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        "import mmsphere.eval.cli\n"
        "from mmsphere.ood import cli\n"
        "def late():\n"
        "    from mmsphere.ood.cli import main\n"
        "    from .cli import main as other\n"
    )
    imported = imported_modules("mmsphere.ood.module", source)
    assert {"mmsphere.eval.cli", "mmsphere.ood.cli", "mmsphere.ood.cli.main"} <= imported
    assert [name for name in sorted(imported) if is_cli(name)] == ["mmsphere.eval.cli", "mmsphere.ood.cli"]
