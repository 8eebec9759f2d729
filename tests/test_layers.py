"""The package's layers, checked on the import graph: nothing points back up.

core (the contract) <- engine (the run) <- the Python API and the CLI; plugins use the core and the
public plugin surface, and the core and the engine reach plugins only through the registries.
"""

import ast
import pathlib

import pytest

import ftengine

PACKAGE = pathlib.Path(ftengine.__file__).parent


def imported_modules(path: pathlib.Path, package: str | None = None) -> set[str]:
    """Every module a file imports, relative imports resolved against ``package`` (by default the
    file's own package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def files_of(layer: str) -> list[pathlib.Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


FORBIDDEN = {
    "core": ("ftengine.engine", "ftengine.plugins", "ftengine.cli", "ftengine.compat", "ftengine.demo"),
    "engine": ("ftengine.plugins", "ftengine.cli", "ftengine.compat"),
    "plugins": ("ftengine.engine", "ftengine.cli", "ftengine.compat"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_points_back_up(layer):
    offences = []
    for path in files_of(layer):
        for module in imported_modules(path):
            if module.startswith(FORBIDDEN[layer]):
                offences.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not offences, offences


def test_python_api_reaches_plugins_through_registries():
    offences = [m for m in imported_modules(PACKAGE / "__init__.py") if m.startswith("ftengine.plugins")]
    assert not offences, offences


def test_the_checker_sees_relative_and_absolute_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from ..engine import pipeline\nimport ftengine.plugins.models\n")
    found = imported_modules(probe, package="ftengine.core")
    assert "ftengine.engine.pipeline" in found and "ftengine.plugins.models" in found
