"""Script data: the scopes, the limits, the invalidation message and the one atomic write.

Three scopes of data, each a map of keys to JSON values (README, "Script data and sessions"):

* ``APP``: an app's data for every shop (``Keys.data_app``). Every shard group's Redis holds it,
  as extension points are; partners write it (``scriptpool data set``, ``DataStore``).
* ``SHOP``: an app's data for one shop (``Keys.data_shop``), in the shop's group. Partners and
  scripts (``storeWrites``) write it.
* ``SESSION``: one shop's session for one app (``Keys.data_session``: the token is hashed into the
  key, so any token string is safe and none is stored). Scripts write it; it expires
  ``session_ttl_s`` after its last write.

Limits (constants: an extension point cannot change them): a key is 1..``MAX_KEY_CHARS``
printable characters; a value is JSON, minified to at most ``MAX_VALUE_BYTES`` and nested at
most ``MAX_VALUE_DEPTH`` deep; a scope (one hash) holds at most ``MAX_KEYS_PER_SCOPE`` keys; the
SHOP and live SESSION data of one shop, every app's together, hold at most
``MAX_BYTES_PER_SHOP`` (each entry counts its key's UTF-8 bytes, its value's and
``ENTRY_OVERHEAD_BYTES``; each live session ``SESSION_OVERHEAD_BYTES`` more); a run returns at most
``MAX_WRITES_PER_RUN`` writes. Passing any is :class:`StoreLimitExceeded` naming the limit.

Every write goes through :func:`apply_writes`: one Lua script, so a call's writes are applied all
or none, and the caps on keys and bytes are checked where the writes happen (two writers cannot
race past them). It publishes one invalidation per call, listing every key written, on
``Keys.invalidations()`` (the channel bindings use, so one subscription and its
forget-all-on-resubscribe cover both): ``{"data": 1, "app": A, "shop_id": S or null, "session":
DIGEST or null, "keys": [[SCOPE, KEY], ...]}``. One message per call rather than per key: every
worker of the group decodes every message on one thread, and a burst of one per key (a run
writes up to 64) overflowed Redis's output buffer for the subscriber, which then forgot
everything; a call's message stays bounded (at most ``MAX_WRITES_PER_RUN`` keys).

Expired sessions: Redis drops a session when its TTL passes without telling anyone, so each shop
keeps its sessions' expiry times and sizes (``Keys.data_sessions``, ``Keys.data_session_sizes``);
the shop's next write gives an expired session's bytes back to its counter (``Keys.data_bytes``)
before checking the cap. Until then ``status`` may count bytes a session no longer holds.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis

from scriptpool.config._keys import Keys
from scriptpool.config.errors import InvalidArgument, StoreLimitExceeded
from scriptpool.config.wire import MAX_SESSION_CHARS, valid_session

__all__ = [
    "APP",
    "DEFAULT_SESSION_TTL_S",
    "ENTRY_OVERHEAD_BYTES",
    "MAX_BYTES_PER_SHOP",
    "MAX_KEYS_PER_SCOPE",
    "MAX_KEY_CHARS",
    "MAX_SESSION_TOKEN_CHARS",
    "MAX_SESSION_TTL_S",
    "MAX_VALUE_BYTES",
    "MAX_VALUE_DEPTH",
    "MAX_WRITES_PER_RUN",
    "MIN_SESSION_TTL_S",
    "SCOPES",
    "SCRIPT_SCOPES",
    "SESSION",
    "SESSION_OVERHEAD_BYTES",
    "SHOP",
    "DataInvalidation",
    "DataSizes",
    "Refusal",
    "Write",
    "apply_writes",
    "check_key",
    "check_scope",
    "check_session_token",
    "check_session_ttl",
    "data_sizes",
    "decode_value",
    "encode_value",
    "entry_bytes",
    "hash_sizes",
    "invalidation_message",
    "parse_invalidation",
    "recount_shop",
    "scope_hash",
]

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


# -- the one atomic write -----------------------------------------------------------------------


class Write(NamedTuple):
    """One write: set ``key`` in ``scope`` to ``value`` (JSON text from :func:`encode_value`),
    or delete it (``value`` None)."""

    scope: str
    key: str
    value: bytes | None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why :func:`apply_writes` wrote nothing: write ``index`` (0-based) passed ``limit``;
    ``current`` and ``maximum`` say by how much where they apply."""

    index: int
    limit: str
    scope: str
    key: str
    message: str
    current: int | None = None
    maximum: int | None = None

    def error(self) -> StoreLimitExceeded:
        """The error this refusal is (what a caller raises)."""
        extra = {n: v for n, v in (("current", self.current), ("maximum", self.maximum)) if v is not None}
        return StoreLimitExceeded(
            self.message, limit=self.limit, scope=self.scope, key=self.key, index=self.index, **extra
        )


# Applies a call's writes all or none. KEYS: 1 the shop's byte counter, 2 its sessions by expiry,
# 3 its sessions' sizes, then one hash per write. ARGV: 1 channel ('' = publish nothing), 2 max
# keys per scope, 3 max bytes per shop, 4 session TTL (ms), 5 '1' if the call has a shop, then
# five per write: scope, key, 'set' or 'del', value, message (the first write's: the call's one
# invalidation; '' in the others). Returns 0, or {write number (1-based), limit, current,
# maximum} for the first write that passes a cap.
# Expired sessions named in the shop's sorted set are read by name (not in KEYS): shard groups
# are separate Redis servers, never one cluster, so every key is on this server. The first line
# sets the costs counted beyond keys and values (ENTRY_OVERHEAD_BYTES, SESSION_OVERHEAD_BYTES);
# a session's size in its sizes hash includes them, so what expiry gives back is what was charged.
_LUA_COSTS = f"local entry_cost, session_cost = {ENTRY_OVERHEAD_BYTES}, {SESSION_OVERHEAD_BYTES}\n"
_LUA = (
    _LUA_COSTS
    + """
local max_keys, max_bytes, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local counted = ARGV[5] == '1'
local bytes_key, sessions_key, sizes_key = KEYS[1], KEYS[2], KEYS[3]
local n = (#ARGV - 5) / 5
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function give_back(name)
  local size = tonumber(redis.call('HGET', sizes_key, name) or '0')
  if size ~= 0 then redis.call('DECRBY', bytes_key, size) end
  redis.call('HDEL', sizes_key, name)
  redis.call('ZREM', sessions_key, name)
end

if counted then
  -- Sessions Redis dropped since the shop's last write give their bytes back (a bounded batch).
  local expired = redis.call('ZRANGEBYSCORE', sessions_key, '-inf', now, 'LIMIT', 0, 100)
  for _, name in ipairs(expired) do
    local left = redis.call('PTTL', name)
    if left > 0 then
      redis.call('ZADD', sessions_key, now + left, name)
    else
      give_back(name)
    end
  end
  -- A session written again after it expired (before the sweep saw it) starts from nothing.
  for i = 1, n do
    local base = 5 + (i - 1) * 5
    if ARGV[base + 1] == 'SESSION' and redis.call('EXISTS', KEYS[3 + i]) == 0
        and redis.call('HEXISTS', sizes_key, KEYS[3 + i]) == 1 then
      give_back(KEYS[3 + i])
    end
  end
end

local total = tonumber(redis.call('GET', bytes_key) or '0')
local pending, sessions = {}, {}
local delta = 0
for i = 1, n do
  local base = 5 + (i - 1) * 5
  local scope, field, op, value = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]
  local hash = KEYS[3 + i]
  local state = pending[hash]
  if not state then
    state = {count = redis.call('HLEN', hash), sizes = {}}
    pending[hash] = state
  end
  local old = state.sizes[field]
  if old == nil then
    if redis.call('HEXISTS', hash, field) == 1 then
      old = #field + redis.call('HSTRLEN', hash, field) + entry_cost
    else
      old = -1
    end
  end
  local new = -1
  if op == 'set' then new = #field + #value + entry_cost end
  local was = state.count
  if old < 0 and new >= 0 then
    state.count = state.count + 1
    if state.count > max_keys then return {i, 'keys_per_scope', state.count - 1, max_keys} end
  elseif old >= 0 and new < 0 then
    state.count = state.count - 1
  end
  state.sizes[field] = new
  if scope ~= 'APP' then
    local d = math.max(new, 0) - math.max(old, 0)
    -- A session costs session_cost while it holds a key (its names in the three structures).
    if scope == 'SESSION' and (was > 0) ~= (state.count > 0) then
      if state.count > 0 then d = d + session_cost else d = d - session_cost end
    end
    delta = delta + d
    if scope == 'SESSION' then sessions[hash] = (sessions[hash] or 0) + d end
    if d > 0 and total + delta > max_bytes then
      return {i, 'bytes_per_shop', total + delta - d, max_bytes}
    end
  end
end

for i = 1, n do
  local base = 5 + (i - 1) * 5
  if ARGV[base + 3] == 'set' then
    redis.call('HSET', KEYS[3 + i], ARGV[base + 2], ARGV[base + 4])
  else
    redis.call('HDEL', KEYS[3 + i], ARGV[base + 2])
  end
end
if delta ~= 0 then
  if redis.call('INCRBY', bytes_key, delta) <= 0 then redis.call('DEL', bytes_key) end
end
for name, d in pairs(sessions) do
  local size = redis.call('HINCRBY', sizes_key, name, d)
  if redis.call('EXISTS', name) == 1 then
    redis.call('PEXPIRE', name, ttl)
    redis.call('ZADD', sessions_key, now + ttl, name)
  else
    if size ~= 0 then redis.call('DECRBY', bytes_key, size) end
    redis.call('HDEL', sizes_key, name)
    redis.call('ZREM', sessions_key, name)
  end
end
-- One message for the whole call, listing every key it wrote (the first write's slot holds it).
if ARGV[1] ~= '' and ARGV[10] ~= '' then redis.call('PUBLISH', ARGV[1], ARGV[10]) end
return 0
"""
)
_SHA = hashlib.sha1(_LUA.encode()).hexdigest()


def _static_refusal(
    index: int, write: Write, shop_id: str | None, session_token: str | None
) -> Refusal | None:
    """What is wrong with one write on its own (before Redis sees any), or None."""
    scope, key, value = write
    try:
        check_scope(scope)
        check_key(key, scope)
    except StoreLimitExceeded as exc:
        return Refusal(index, exc.detail["limit"], str(scope), str(key)[:MAX_KEY_CHARS], exc.message)
    if scope != APP and shop_id is None:
        return Refusal(index, "scope", scope, key, f"a {scope} write needs a shop")
    if scope == SESSION and session_token is None:
        return Refusal(index, "session", scope, key, "a SESSION write needs a session, and this run has none")
    if value is not None:
        if not isinstance(value, bytes):
            return Refusal(index, "value_json", scope, key, "a data value must be JSON text (encode_value)")
        if len(value) > MAX_VALUE_BYTES:
            return Refusal(
                index,
                "value_bytes",
                scope,
                key,
                f"a data value takes {len(value)} bytes as JSON, more than {MAX_VALUE_BYTES}",
                len(value),
                MAX_VALUE_BYTES,
            )
    return None


def apply_writes(
    redis_client: redis.Redis,
    keys: Keys,
    app: str,
    shop_id: str | None,
    session_token: str | None,
    writes: Iterable[Write | tuple[str, str, bytes | None]],
    *,
    session_ttl_s: int | None = None,
    channel: str | None = None,
) -> Refusal | None:
    """Apply ``writes`` (scope, key, JSON text from :func:`encode_value` or None to delete) of
    ``app`` for ``shop_id`` (None: APP writes only) and the session ``session_token`` (None: no
    SESSION writes) in one Lua script: all of them, or, if one passes a limit, none. Returns
    None, or the :class:`Refusal` of the first write over a limit (raise ``refusal.error()``).

    The caps on keys per scope and bytes per shop are checked inside the script, so writers
    racing each other cannot pass them together. Every write to a session sets its TTL to
    ``session_ttl_s`` (None: ``DEFAULT_SESSION_TTL_S``). The keys written are announced in one
    message on ``channel`` (None: ``keys.invalidations()``; "": nowhere). Redis failures propagate as
    redis-py's errors."""
    batch = [Write(*w) for w in writes]
    if len(batch) > MAX_WRITES_PER_RUN:
        first = batch[MAX_WRITES_PER_RUN]
        return Refusal(
            MAX_WRITES_PER_RUN,
            "writes_per_run",
            str(first.scope),
            str(first.key)[:MAX_KEY_CHARS],
            f"{len(batch)} data writes at once, more than {MAX_WRITES_PER_RUN}",
            len(batch),
            MAX_WRITES_PER_RUN,
        )
    for index, write in enumerate(batch):
        refusal = _static_refusal(index, write, shop_id, session_token)
        if refusal is not None:
            return refusal
    if not batch:
        return None
    ttl_s = DEFAULT_SESSION_TTL_S if session_ttl_s is None else session_ttl_s
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
        # Not check_session_ttl's range: the EP setting is checked where it is defined.
        raise InvalidArgument(f"session_ttl_s must be a positive whole number, not {ttl_s!r}")
    digest = keys.session_digest(session_token) if session_token is not None else None
    shop = shop_id if shop_id is not None else ""
    names = [keys.data_bytes(shop), keys.data_sessions(shop), keys.data_session_sizes(shop)]
    args: list[str | bytes | int] = [
        keys.invalidations() if channel is None else channel,
        MAX_KEYS_PER_SCOPE,
        MAX_BYTES_PER_SHOP,
        ttl_s * 1000,
        "1" if shop_id is not None else "0",
    ]
    # The call's one invalidation (every key written, once) rides in the first write's slot.
    message = invalidation_message(
        app,
        shop_id,
        digest if any(w.scope == SESSION for w in batch) else None,
        [(w.scope, w.key) for w in batch],
    )
    for scope, key, value in batch:
        if scope == APP:
            hash_name = keys.data_app(app)
        elif scope == SHOP:
            hash_name = keys.data_shop(app, shop)
        else:
            hash_name = keys.data_session_of_digest(app, shop, digest or "")
        names.append(hash_name)
        args += [
            scope,
            key,
            "set" if value is not None else "del",
            value if value is not None else b"",
            message,
        ]
        message = ""
    try:
        answer: Any = redis_client.evalsha(_SHA, len(names), *names, *args)
    except redis.exceptions.NoScriptError:
        answer = redis_client.eval(_LUA, len(names), *names, *args)
    if not isinstance(answer, list):
        return None
    number, limit, current, maximum = answer
    write = batch[int(number) - 1]
    limit = limit.decode() if isinstance(limit, bytes) else str(limit)
    if limit == "keys_per_scope":
        message = f"{write.scope} data of app {app!r} already holds {current} keys, the most a scope may hold"
    else:
        message = (
            f"the SHOP and SESSION data of shop {shop_id!r} count {current} bytes "
            f"({ENTRY_OVERHEAD_BYTES} per key and {SESSION_OVERHEAD_BYTES} per session included); "
            f"writing {write.key!r} would pass {maximum}"
        )
    return Refusal(int(number) - 1, limit, write.scope, write.key, message, int(current), int(maximum))


# Sets a shop's counter, its sessions' sizes and their expiry times from what its hashes hold.
# KEYS: 1 the counter, 2 the sessions by expiry, 3 the sessions' sizes, then ARGV[1] SHOP hashes,
# then session hashes. Sessions the bookkeeping names (written since the caller listed the keys)
# are counted too. Returns the new count.
_RECOUNT_LUA = (
    _LUA_COSTS
    + """
local bytes_key, sessions_key, sizes_key = KEYS[1], KEYS[2], KEYS[3]
local shops = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function held(name)
  local entries = redis.call('HGETALL', name)
  local sum = 0
  for j = 1, #entries, 2 do sum = sum + #entries[j] + #entries[j + 1] + entry_cost end
  return sum, #entries / 2
end
local total = 0
for i = 4, 3 + shops do total = total + held(KEYS[i]) end
local names = {}
for i = 4 + shops, #KEYS do names[KEYS[i]] = true end
for _, name in ipairs(redis.call('HKEYS', sizes_key)) do names[name] = true end
for _, name in ipairs(redis.call('ZRANGE', sessions_key, 0, -1)) do names[name] = true end
redis.call('DEL', sizes_key, sessions_key)
for name in pairs(names) do
  local sum, count = held(name)
  local left = redis.call('PTTL', name)
  if count > 0 then
    sum = sum + session_cost
    total = total + sum
    redis.call('HSET', sizes_key, name, sum)
    -- A session without a TTL (none we wrote) never expires: it stays counted.
    if left > 0 then redis.call('ZADD', sessions_key, now + left, name) end
  end
end
if total > 0 then redis.call('SET', bytes_key, total) else redis.call('DEL', bytes_key) end
return total
"""
)


def recount_shop(
    redis_client: redis.Redis,
    keys: Keys,
    shop_id: str,
    shop_hashes: Iterable[str],
    session_hashes: Iterable[str],
) -> int:
    """Set ``shop_id``'s byte counter, its sessions' sizes and expiry times from what its data
    hashes really hold (``shop_hashes``: its SHOP data, one per app; ``session_hashes``: its
    sessions; sessions its bookkeeping names are counted too), in one Lua script, so the result
    is consistent with whatever wrote before it. Returns the new count. ``shard copy`` runs it
    after copying a shop's data, which it cannot copy at one instant."""
    shops, sessions = list(shop_hashes), list(session_hashes)
    names = [keys.data_bytes(shop_id), keys.data_sessions(shop_id), keys.data_session_sizes(shop_id)]
    names += shops + sessions
    return int(redis_client.eval(_RECOUNT_LUA, len(names), *names, len(shops)))


def hash_sizes(raw: dict[Any, Any]) -> dict[str, int]:
    """A data hash's keys -> their values' bytes (what ``data list`` shows), sorted by key."""
    return {(k.decode() if isinstance(k, bytes) else str(k)): len(v) for k, v in sorted(raw.items())}


def scope_hash(keys: Keys, scope: str, app: str, shop_id: str | None, session: str | None = None) -> str:
    """The Redis hash holding ``app``'s data in ``scope`` (SESSION: ``session`` is the token)."""
    if scope == APP:
        return keys.data_app(app)
    if shop_id is None:
        raise InvalidArgument(f"{scope} data needs a shop", kind="shop")
    if scope == SHOP:
        return keys.data_shop(app, shop_id)
    return keys.data_session(app, shop_id, check_session_token(session))


# -- sizes, for ``status`` ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataSizes:
    """What one Redis holds of script data: the shops with SHOP or SESSION data and their bytes
    (from their counters), and the apps with APP data and their keys. ``complete`` is False when
    the count stopped at its bound (then the figures are at least these)."""

    shops: int
    shop_bytes: int
    apps: int
    app_keys: int
    complete: bool


def data_sizes(client: redis.Redis, keys: Keys, *, most: int = 10_000) -> DataSizes:
    """Count what ``client``'s Redis holds of script data, reading at most ``most`` counters and
    ``most`` APP hashes (SCAN, so a large keyspace is never blocked on)."""
    complete = True
    counters: list[Any] = []
    for name in client.scan_iter(match=f"{keys.prefix}:data-bytes:*", count=500):
        if len(counters) >= most:
            complete = False
            break
        counters.append(name)
    apps: list[Any] = []
    for name in client.scan_iter(match=keys.data_app_pattern(), count=500):
        if len(apps) >= most:
            complete = False
            break
        apps.append(name)
    shop_bytes = sum(int(v) for v in client.mget(counters) if v is not None) if counters else 0
    app_keys = 0
    if apps:
        with client.pipeline(transaction=False) as pipe:
            for name in apps:
                pipe.hlen(name)
            app_keys = sum(int(n) for n in pipe.execute())
    return DataSizes(len(counters), max(shop_bytes, 0), len(apps), app_keys, complete)
