"""The scopes of script data and their limits: what a key and a value may be."""

from __future__ import annotations

import json
import math
from typing import Any

from scriptpool.config.errors import InvalidArgument, StoreLimitExceeded
from scriptpool.config.wire import MAX_SESSION_CHARS, valid_session

APP = "APP"
SHOP = "SHOP"
SESSION = "SESSION"
SCOPES: tuple[str, ...] = (APP, SHOP, SESSION)
# What a script's storeWrites may name: APP data is the partner's alone.
SCRIPT_SCOPES: tuple[str, ...] = (SHOP, SESSION)

MAX_KEY_CHARS = 256
MAX_VALUE_BYTES = 64 * 1024
MAX_VALUE_DEPTH = 32
MAX_KEYS_PER_SCOPE = 1_000
MAX_BYTES_PER_SHOP = 4 * 1024 * 1024
# What MAX_BYTES_PER_SHOP counts beyond keys and values, so that it bounds Redis's memory: an
# entry (SHOP or SESSION) costs its hash field's bookkeeping, and a live session its key name
# three times over (its hash, its member of Keys.data_sessions, its field of
# Keys.data_session_sizes, ~70 characters each) with those structures' own entries. Measured on
# Redis 7: ~490 bytes of memory per one-key session; 2 bytes of it were counted before these.
ENTRY_OVERHEAD_BYTES = 64
SESSION_OVERHEAD_BYTES = 256
MAX_WRITES_PER_RUN = 64
DEFAULT_SESSION_TTL_S = 1_800
MIN_SESSION_TTL_S = 60
MAX_SESSION_TTL_S = 30 * 24 * 3600
# Tokens are hashed, so any string is safe; the cap only bounds what a caller hashes per run.
MAX_SESSION_TOKEN_CHARS = MAX_SESSION_CHARS  # one rule with the client and the job (config.wire)


def _refuse(
    message: str, limit: str, scope: str | None, key: str | None, **detail: Any
) -> StoreLimitExceeded:
    return StoreLimitExceeded(message, limit=limit, scope=scope, key=key, **detail)


def check_scope(scope: object) -> str:
    """Return ``scope`` if it is ``APP``, ``SHOP`` or ``SESSION``."""
    if not isinstance(scope, str) or scope not in SCOPES:
        raise _refuse(f"unknown data scope {scope!r}: APP, SHOP or SESSION", "scope", None, None)
    return scope


def check_key(key: object, scope: str | None = None) -> str:
    """Return ``key`` if it is a valid data key: a string of 1..``MAX_KEY_CHARS`` printable
    characters (no control characters, no line breaks)."""
    if not isinstance(key, str) or not key:
        raise _refuse(f"a data key must be a non-empty string, not {key!r:.80}", "key", scope, None)
    if len(key) > MAX_KEY_CHARS:
        raise _refuse(
            f"data key {key[:40]!r}... has {len(key)} characters, more than {MAX_KEY_CHARS}",
            "key_chars",
            scope,
            key[:MAX_KEY_CHARS],
            maximum=MAX_KEY_CHARS,
        )
    if not key.isprintable():
        raise _refuse(
            f"data key {key!r} holds a control or unprintable character", "key_printable", scope, key
        )
    return key


def check_session_token(token: object) -> str:
    """Return ``token`` if it can name a session: 1 to ``MAX_SESSION_TOKEN_CHARS`` printable
    characters, the rule ``client.run(session=)`` and a job's ``session`` follow too."""
    if not isinstance(token, str) or not valid_session(token):
        raise InvalidArgument(
            f"a session token must be a string of 1 to {MAX_SESSION_TOKEN_CHARS} printable characters",
            kind="session",
        )
    return token


def check_session_ttl(seconds: object) -> int:
    """Return ``seconds`` if it is a whole number of seconds in ``MIN_SESSION_TTL_S`` ..
    ``MAX_SESSION_TTL_S`` (one minute to 30 days)."""
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int)
        or not MIN_SESSION_TTL_S <= seconds <= MAX_SESSION_TTL_S
    ):
        raise InvalidArgument(
            f"session TTL must be whole seconds in {MIN_SESSION_TTL_S}..{MAX_SESSION_TTL_S} "
            f"(1 minute to 30 days), not {seconds!r}",
            kind="session_ttl_s",
        )
    return seconds


def _depth_and_kind(value: Any) -> tuple[int, str | None]:
    """(How deeply ``value`` nests, the first thing in it that is not JSON or None), without
    recursion: a hostile value nested 100,000 deep must not overflow Python's stack."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            depth += 1
            if depth > MAX_VALUE_DEPTH:
                return depth, None
            for name, inner in item.items():
                if not isinstance(name, str):
                    return depth, f"object key {name!r:.40}"
                stack.append((inner, depth))
        elif isinstance(item, list):
            depth += 1
            if depth > MAX_VALUE_DEPTH:
                return depth, None
            stack.extend((inner, depth) for inner in item)
        elif isinstance(item, float):
            if not math.isfinite(item):
                return depth, repr(item)
        elif item is not None and not isinstance(item, str | int | bool):
            return depth, type(item).__name__
        deepest = max(deepest, depth)
    return deepest, None


def encode_value(value: Any, *, scope: str | None = None, key: str | None = None) -> bytes:
    """``value`` as minified JSON text (UTF-8), or :class:`StoreLimitExceeded` if it is not JSON
    (objects with string keys, arrays, strings, finite numbers, booleans, null), nests deeper than
    ``MAX_VALUE_DEPTH`` or takes more than ``MAX_VALUE_BYTES``."""
    depth, bad = _depth_and_kind(value)
    if bad is not None:
        raise _refuse(f"a data value must be JSON; {bad} is not", "value_json", scope, key)
    if depth > MAX_VALUE_DEPTH:
        raise _refuse(
            f"a data value may nest {MAX_VALUE_DEPTH} deep at most",
            "value_depth",
            scope,
            key,
            maximum=MAX_VALUE_DEPTH,
        )
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        encoded = text.encode()
    except UnicodeEncodeError:  # a lone surrogate: no JSON parser would read it back
        raise _refuse(
            "a data value must be JSON; it holds a lone surrogate", "value_json", scope, key
        ) from None
    if len(encoded) > MAX_VALUE_BYTES:
        raise _refuse(
            f"a data value takes {len(encoded)} bytes as JSON, more than {MAX_VALUE_BYTES}",
            "value_bytes",
            scope,
            key,
            size=len(encoded),
            maximum=MAX_VALUE_BYTES,
        )
    return encoded


def decode_value(raw: bytes | str) -> Any:
    """A stored value back as Python (it was written by :func:`encode_value`)."""
    return json.loads(raw)


def entry_bytes(key: str, value: bytes) -> int:
    """What one entry counts against ``MAX_BYTES_PER_SHOP``: its key's UTF-8 bytes, its value's
    and ``ENTRY_OVERHEAD_BYTES`` (a session's first entry costs ``SESSION_OVERHEAD_BYTES`` more)."""
    return len(key.encode()) + len(value) + ENTRY_OVERHEAD_BYTES
