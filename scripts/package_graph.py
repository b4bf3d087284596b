"""Print which top-level package imports which, and any import of another package's private
module: ``python scripts/package_graph.py``, with any Python 3.11 (the venv is not needed: it
reads the sources with the standard library's ``ast``, as import-linter's grimp reads them,
every import counted, those inside functions and ``TYPE_CHECKING`` blocks too)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "engine", "registry", "workers", "producer", "scriptpool")


def main() -> int:
    present = [name for name in PACKAGES if (ROOT / name / "__init__.py").is_file()]
    modules = {name: path for package in present for name, path in _modules(package)}
    private_imports = 0
    for importer in present:
        edges: dict[str, set[tuple[str, str]]] = {}
        for module, path in modules.items():
            if module.split(".")[0] != importer:
                continue
            for imported in _imports(module, path, modules):
                top = imported.split(".")[0]
                if top != importer and top in present:
                    edges.setdefault(top, set()).add((module, imported))
        for imported_package, links in sorted(edges.items()):
            private = sorted(
                f"{m} -> {i}" for m, i in links if any(p.startswith("_") for p in i.split(".")[1:])
            )
            private_imports += len(private)
            note = f"; private: {', '.join(private)}" if private else ""
            print(f"{importer} -> {imported_package}: {len(links)} imports{note}")
    print(f"imports of another package's private modules: {private_imports}")
    return 0


def _modules(package: str) -> list[tuple[str, Path]]:
    """Every module of ``package`` by its dotted name, with its file."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.append((".".join(parts), path))
    return found


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules ``module`` imports directly: ``from a import b`` is a.b when b is a module,
    else a; a relative import is resolved against ``module``'s package."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    return found


if __name__ == "__main__":
    sys.exit(main())
