"""Print which layer of the ``scriptpool`` namespace imports which (``config -> ...`` means
``scriptpool.config``), and any import of another layer's private module: ``python
scripts/package_graph.py``, with any Python 3.11 (the venv is not needed: it reads the sources
with the standard library's ``ast``, as import-linter's grimp reads them, every import counted,
those inside functions and ``TYPE_CHECKING`` blocks too)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each layer of the namespace and its folder (scriptpool/ links to the top-level ones).
LAYERS = {
    "config": "config",
    "engine": "engine",
    "registry": "registry",
    "runtime": "runtime",
    "workers": "workers",
    "producer": "producer",
    "testing": "scriptpool/testing",
    "cli": "scriptpool/cli",
}


def main() -> int:
    present = [name for name, folder in LAYERS.items() if (ROOT / folder / "__init__.py").is_file()]
    modules = {name: path for layer in present for name, path in _modules(layer)}
    private_imports = 0
    for importer in present:
        edges: dict[str, set[tuple[str, str]]] = {}
        for module, path in modules.items():
            if _layer(module) != importer:
                continue
            for imported in _imports(module, path, modules):
                top = _layer(imported)
                if top != importer and top in present:
                    edges.setdefault(top, set()).add((module, imported))
        for imported_package, links in sorted(edges.items()):
            private = sorted(
                f"{m} -> {i}" for m, i in links if any(p.startswith("_") for p in i.split(".")[2:])
            )
            private_imports += len(private)
            note = f"; private: {', '.join(private)}" if private else ""
            print(f"{importer} -> {imported_package}: {len(links)} imports{note}")
    print(f"imports of another package's private modules: {private_imports}")
    return 0


def _layer(module: str) -> str:
    """``scriptpool.config._keys`` -> ``config``; anything outside the namespace -> ``""``."""
    parts = module.split(".")
    return parts[1] if parts[0] == "scriptpool" and len(parts) > 1 else ""


def _modules(layer: str) -> list[tuple[str, Path]]:
    """Every module of ``layer`` by its dotted name (``scriptpool.<layer>...``), with its file."""
    folder = ROOT / LAYERS[layer]
    found = []
    for path in sorted(folder.rglob("*.py")):
        parts = ["scriptpool", layer, *path.relative_to(folder).with_suffix("").parts]
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
