"""Print which top-level package imports which, and any import of another package's private
module: ``python scripts/package_graph.py`` (grimp comes with import-linter, in the test extra)."""

from __future__ import annotations

import sys

import grimp

PACKAGES = ("config", "engine", "registry", "workers", "producer", "scriptpool")


def main() -> int:
    present = [name for name in PACKAGES if _importable(name)]
    graph = grimp.build_graph(*present)
    private_imports = 0
    for importer in present:
        edges: dict[str, set[tuple[str, str]]] = {}
        for module in graph.find_descendants(importer) | {importer}:
            for imported in graph.find_modules_directly_imported_by(module):
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


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
