"""The code's layout keeps its promises: error codes spelled once, a public ``__all__`` per
package, typed packages, and tests and scripts kept apart. (Import layers are checked by
import-linter in ``make lint``.)"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from scriptpool.config.errors import ScriptpoolError
from tests.conftest import ROOT

PACKAGES = ("config", "engine", "registry", "workers", "producer", "scriptpool")


def _codes() -> set[str]:
    found: set[str] = set()
    pending: list[type[ScriptpoolError]] = [ScriptpoolError]
    while pending:
        cls = pending.pop()
        found.add(cls.code)
        pending.extend(cls.__subclasses__())
    return found


def _sources(*folders: str) -> list[Path]:
    return [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]


def test_no_error_code_is_spelled_outside_config_errors() -> None:
    """Callers name the error class (``DeadlineExceeded.code``), never the code's text."""
    codes = _codes()
    offenders = []
    for path in _sources(*PACKAGES):
        if path == ROOT / "config" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in codes:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert offenders == []


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_typed_and_exports_what_its_all_names(package: str) -> None:
    """Each package ships ``py.typed`` and an ``__all__`` whose every name exists."""
    module = importlib.import_module(package)
    assert (ROOT / package / "py.typed").is_file()
    names = module.__all__
    assert names and all(hasattr(module, name) for name in names), package


def test_tests_and_scripts_do_not_import_each_other() -> None:
    """Benchmark scripts import the product, never the tests; tests never import scripts."""

    def imports(path: Path) -> set[str]:
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        return found

    script_modules = {path.stem for path in (ROOT / "scripts").glob("*.py")}
    for path in _sources("scripts"):
        assert "tests" not in imports(path), path
    for path in _sources("tests"):
        assert not imports(path) & (script_modules | {"scripts"}), path
