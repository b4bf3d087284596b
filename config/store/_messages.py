"""The invalidation message a data write publishes, and its parser (hostile input tolerated)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from scriptpool.config.store._limits import APP, MAX_KEY_CHARS, MAX_WRITES_PER_RUN, SCOPES, SESSION

# -- invalidation messages ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataInvalidation:
    """One call's writes, announced together: ``keys`` are the (scope, key) pairs written of
    ``app``'s data; APP ones are every shop's, SHOP ones ``shop_id``'s, SESSION ones the session
    of ``shop_id`` whose token's digest is ``session``."""

    app: str
    shop_id: str | None
    session: str | None
    keys: tuple[tuple[str, str], ...]


def invalidation_message(
    app: str, shop_id: str | None, session: str | None, keys: Iterable[tuple[str, str]]
) -> str:
    """The one message announcing a call's writes of ``app``'s data: ``keys`` the (scope, key)
    pairs written, each listed once (``session``: the token's digest, ``Keys.session_digest``,
    needed only for SESSION keys; ``shop_id`` None when the call has no shop, APP keys only)."""
    return json.dumps(
        {"data": 1, "app": app, "shop_id": shop_id, "session": session, "keys": list(dict.fromkeys(keys))},
        separators=(",", ":"),
        ensure_ascii=False,
    )


# A real message lists at most MAX_WRITES_PER_RUN keys of at most MAX_KEY_CHARS characters, each
# 4 UTF-8 bytes at worst (about 70 KiB); the rest is an app, a shop and a digest.
_MAX_MESSAGE_BYTES = MAX_WRITES_PER_RUN * (4 * MAX_KEY_CHARS + 32) + 8 * 1024


def parse_invalidation(data: bytes | str | Any) -> DataInvalidation | None:
    """The data invalidation ``data`` holds (its text, or the object it decodes to, as the
    listener hands it over), or None if it is not one or is malformed in any way (anyone who
    can publish on the channel can send anything)."""
    if isinstance(data, (bytes, str)):
        if len(data) > _MAX_MESSAGE_BYTES:
            return None
        try:
            data = json.loads(data)
        except (ValueError, TypeError, RecursionError):  # not JSON, not UTF-8, nested past the stack
            return None
    if not isinstance(data, dict) or data.get("data") != 1:
        return None
    app, shop, session, listed = (data.get(n) for n in ("app", "shop_id", "session", "keys"))
    if not isinstance(app, str) or not app or not isinstance(listed, list):
        return None
    if len(listed) > MAX_WRITES_PER_RUN or not (shop is None or (isinstance(shop, str) and shop)):
        return None
    if not (session is None or (isinstance(session, str) and session)):
        return None
    keys: list[tuple[str, str]] = []
    for pair in listed:
        if not isinstance(pair, list) or len(pair) != 2:
            return None
        scope, key = pair
        if scope not in SCOPES or not isinstance(key, str):
            return None
        if scope != APP and (shop is None or (scope == SESSION and session is None)):
            return None
        keys.append((scope, key))
    return DataInvalidation(app, shop, session, tuple(keys))
