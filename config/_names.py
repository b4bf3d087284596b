"""Checks of what a caller passes: the names and ids that end up inside Redis keys, and
integers that must lie in a range."""

from __future__ import annotations

import re

from scriptpool.config.errors import InvalidArgument

_EP_NAME = re.compile(r"[a-z][a-z0-9_\-]{0,63}")
_SHOP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.]{0,127}")
_EXPORT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.]{0,127}")
_PROVIDER = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.]{0,127}")
# Each pattern above in words, every rule of it: the length, the first character, the others.
_EP_RULE = "1-64 characters: a-z first, then a-z, 0-9, '_' or '-'"
_SHOP_RULE = (
    "1-128 characters: A-Z, a-z or 0-9 first, then those, '_', '-' or '.' (or a whole number, 0 or more)"
)
_IDENTIFIER_RULE = "1-128 characters: A-Z, a-z or '_' first, then those, 0-9, '-' or '.'"


def _check(kind: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidArgument(f"invalid {kind} {value!r}: {rule}", kind=kind)
    return value


def is_name(text: str) -> bool:
    """Whether ``text`` is a valid extension point or app name (a check that raises nothing,
    for names read back from Redis or counted on a hot path)."""
    return _EP_NAME.fullmatch(text) is not None


def is_shop_id(text: str) -> bool:
    """Whether ``text`` is a valid shop id as a string (see :func:`is_name`)."""
    return _SHOP_ID.fullmatch(text) is not None


def check_ep(name: object) -> str:
    """Return ``name`` if it is a valid extension point name."""
    return _check("extension point", name, _EP_NAME, _EP_RULE)


def check_app(name: object) -> str:
    """Return ``name`` if it is a valid app name (the same rule as extension points)."""
    return _check("app", name, _EP_NAME, _EP_RULE)


def check_shop_id(shop_id: object) -> str:
    """Return ``shop_id`` as a string if it is a valid shop id (ints are accepted)."""
    if isinstance(shop_id, int) and not isinstance(shop_id, bool) and shop_id >= 0:
        shop_id = str(shop_id)
    return _check("shop id", shop_id, _SHOP_ID, _SHOP_RULE)


def check_export(name: object) -> str:
    """Return ``name`` if it is a plausible Wasm export name for an entry point."""
    return _check("export", name, _EXPORT, _IDENTIFIER_RULE)


def check_provider(name: object) -> str:
    """Return ``name`` if it is a valid provider (import module) name."""
    return _check("provider", name, _PROVIDER, _IDENTIFIER_RULE)


def check_integer(owner: str, name: str, value: object, low: int, high: int) -> None:
    """:class:`InvalidArgument` naming ``owner.name`` and its range unless ``value`` is an
    integer (not a bool) from ``low`` to ``high``."""
    if type(value) is not int or not low <= value <= high:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise InvalidArgument(
            f"{owner}.{name} must be an integer from {low:,} to {high:,}, got {shown}", field=name
        )
