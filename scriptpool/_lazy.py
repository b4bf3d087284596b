"""A package's names imported on first use (PEP 562), for the packages whose import must stay
cheap: ``scriptpool`` (every command imports it first), ``scriptpool.testing`` and
``scriptpool.workers`` (``scriptpool worker`` builds its command line without Celery)."""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing typing is a cost ``--version`` need not pay
if TYPE_CHECKING:
    from collections.abc import Callable


def lazy_exports(
    package: str, homes: dict[str, str], namespace: dict[str, object]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose globals are ``namespace``: a
    name of ``homes`` is imported from the module named there when first asked for, then kept in
    ``namespace`` so that the next lookup is an ordinary one."""

    def __getattr__(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        exported = namespace.get("__all__", ())
        assert isinstance(exported, list)
        return sorted({*namespace, *exported})

    return __getattr__, __dir__
