"""Writes a script returns: a top-level ``storeWrites`` list in its output, each
``{"scope": "SHOP" or "SESSION", "key": ..., "value": JSON or null to delete}``.

Writing by returning keeps every ABI as it is (no new import: a Javy, Rust or C module can do
it) and every run a pure function of its input, so capture and replay stay exact. The runtime
takes the list out of the output before the EP's output schema sees it (schemas need not allow
it) and checks every write at once: the scope, the key, the value's size and depth
(``scriptpool.config.store``), at most ``MAX_WRITES_PER_RUN`` of them, and a SESSION write only
in a call that has a session. One bad write fails the run with ``store_limit_exceeded`` naming
it; then none of the run's writes is applied. The writes of a successful run travel with its
result to the worker (never in the reply), which applies them after the reply, atomically per
run (``scriptpool.config.store.apply_writes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scriptpool.config.errors import ScriptpoolError, StoreLimitExceeded
from scriptpool.config.store import MAX_WRITES_PER_RUN, SCRIPT_SCOPES, SESSION, check_key, encode_value

# The output's field that carries the writes; the host never sees it.
STORE_WRITES = "storeWrites"
_WRITE_FIELDS = frozenset(("scope", "key", "value"))
_SHOWN_KEY = 80  # characters of a refused key a message repeats (a hostile key may be huge)


@dataclass(frozen=True, slots=True)
class StoreWrite:
    """One checked write: its scope, key, and the value's JSON bytes (None deletes the key)."""

    scope: str
    key: str
    value: bytes | None

    def shown(self) -> dict[str, Any]:
        """The write as ``replay`` and ``run --local`` print it (the value as text)."""
        value = None if self.value is None else self.value.decode("utf-8", errors="replace")
        return {"scope": self.scope, "key": self.key, "value": value}


@dataclass(frozen=True, slots=True)
class AppWrites:
    """The writes of one app's successful run in a call, for the worker to apply after the
    reply to that app's data, with the EP's session TTL."""

    app: str
    writes: tuple[StoreWrite, ...]
    session_ttl_s: int | None  # None: the store's default


NO_WRITES: tuple[StoreWrite, ...] = ()


def take_writes(output: Any, *, session: bool) -> tuple[Any, tuple[StoreWrite, ...]]:
    """``output`` without its ``storeWrites`` (taken out of the decoded output in place) and the
    writes, checked; :class:`StoreLimitExceeded` naming the first bad write. ``session``: whether
    the call has a session (a SESSION write needs one)."""
    if type(output) is not dict or STORE_WRITES not in output:
        return output, NO_WRITES
    return output, check_writes(output.pop(STORE_WRITES), session=session)


def check_writes(raw: Any, *, session: bool) -> tuple[StoreWrite, ...]:
    """The writes ``raw`` (a script's ``storeWrites``) lists, each checked; null is none."""
    if raw is None:
        return NO_WRITES
    if type(raw) is not list:
        raise StoreLimitExceeded(
            f"{STORE_WRITES} is a list of writes, got {_json_type(raw)}", limit="not_a_list"
        )
    if len(raw) > MAX_WRITES_PER_RUN:
        raise StoreLimitExceeded(
            f"{STORE_WRITES} lists {len(raw)} writes; a run may write at most {MAX_WRITES_PER_RUN}",
            limit="writes_per_run",
            current=len(raw),
            maximum=MAX_WRITES_PER_RUN,
        )
    return tuple(_write(i, item, session) for i, item in enumerate(raw))


def _write(index: int, item: Any, session: bool) -> StoreWrite:
    where = f"{STORE_WRITES}[{index}]"
    if type(item) is not dict or "scope" not in item or "key" not in item or not set(item) <= _WRITE_FIELDS:
        raise StoreLimitExceeded(
            f'{where} is not a write: an object with "scope", "key" and "value" (null deletes)',
            index=index,
            limit="not_a_write",
        )
    scope, key = item["scope"], item["key"]
    if scope not in SCRIPT_SCOPES or type(scope) is not str:
        raise StoreLimitExceeded(
            f"{where}: scope {str(scope)[:_SHOWN_KEY]!r} cannot be written by a script (SHOP or SESSION)",
            index=index,
            limit="scope",
        )
    if scope == SESSION and not session:
        raise StoreLimitExceeded(
            f"{where}: a SESSION write needs a session, and this call has none "
            "(the caller passes session=TOKEN)",
            index=index,
            limit="session",
        )
    try:
        checked = check_key(key, scope)
        value = item.get("value")
        encoded = None if value is None else encode_value(value, scope=scope, key=checked)
    except ScriptpoolError as exc:
        shown = key[:_SHOWN_KEY] if type(key) is str else _json_type(key)
        raise StoreLimitExceeded(
            f"{where} (key {shown!r}): {exc.message}",
            index=index,
            limit=str(exc.detail.get("limit") or exc.code),
        ) from None
    return StoreWrite(scope, checked, encoded)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
