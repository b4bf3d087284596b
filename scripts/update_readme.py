"""Rewrite the README's configuration table from scriptpool.config.environment.VARIABLES (a test
holds them equal): ``.venv/bin/python scripts/update_readme.py``."""

from __future__ import annotations

from pathlib import Path

from scriptpool.config import Settings
from scriptpool.config.environment import markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"


def main() -> None:
    text = README.read_text()
    start = text.index("| variable | meaning | default |")
    end = text.index("\n\n", start)
    README.write_text(text[:start] + markdown_table(Settings().field_values()) + text[end:])


if __name__ == "__main__":
    main()
