"""Plain-text tables that print row by row, so long commands show progress as they go."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO


class LiveTable:
    """Prints a header, then each row as soon as it is added, in fixed-width columns."""

    def __init__(self, columns: Sequence[tuple[str, int]], out: TextIO | None = None) -> None:
        self._columns = columns
        self._out = out or sys.stdout
        self._line([name for name, _ in columns])
        self._line(["-" * width for _, width in columns])

    def row(self, *cells: object) -> None:
        self._line([_cell(c) for c in cells])

    def _line(self, cells: Sequence[str]) -> None:
        parts = [cell[:width].ljust(width) for cell, (_, width) in zip(cells, self._columns, strict=True)]
        print("  ".join(parts).rstrip(), file=self._out, flush=True)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
