"""The ``scriptpool`` command-line tool: :func:`main`, and the commands behind it.

It sits on top of every other package and is the only one that imports them all. What tests and
benchmark scripts share (a private Redis, a local pool, a Sentinel set, measuring helpers) is in
:mod:`scriptpool.testing`.

``main`` is imported on first use: every ``scriptpool`` command imports this package first.
"""

from __future__ import annotations

# Not ``typing.TYPE_CHECKING``: importing typing is a cost ``--version`` need not pay, and mypy
# treats any constant of this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from scriptpool.cli._cli import main

__all__ = ["main"]


def __getattr__(name: str) -> object:
    if name != "main":
        raise AttributeError(f"module 'scriptpool.cli' has no attribute {name!r}")
    from scriptpool.cli._cli import main

    globals()["main"] = main  # the next lookup is an ordinary one
    return main


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
