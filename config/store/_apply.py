"""The one atomic write (a Lua script): every data write, the host's and a script's, and the
recount that mends a shop's byte counter."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis

from scriptpool.config._keys import Keys
from scriptpool.config.errors import InvalidArgument, StoreLimitExceeded
from scriptpool.config.store._limits import (
    APP,
    DEFAULT_SESSION_TTL_S,
    ENTRY_OVERHEAD_BYTES,
    MAX_BYTES_PER_SHOP,
    MAX_KEY_CHARS,
    MAX_KEYS_PER_SCOPE,
    MAX_VALUE_BYTES,
    MAX_WRITES_PER_RUN,
    SESSION,
    SESSION_OVERHEAD_BYTES,
    SHOP,
    check_key,
    check_scope,
    check_session_token,
)
from scriptpool.config.store._messages import invalidation_message

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
