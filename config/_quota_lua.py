"""The two Lua scripts that enforce quotas across every worker of a shard group: ``admit`` (both
checks, then the in-flight insert) and ``finish`` (free the slot, charge the instructions).

One script each, so that two workers admitting at once cannot both take the last slot or the
last tokens: Redis runs a script whole. ``now`` is the worker's clock, passed in rather than read
with ``TIME``, so that tests drive time; workers of one shard run on synchronised hosts, and a
bucket stamped slightly in the future only refills a little later.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from scriptpool.config._keys import Keys

# Debt (tokens below zero) is bounded by this many seconds of the rate: a hostile or corrupt
# bucket (-inf) heals within it, and a run worth more than an hour of its target's rate is a
# quota set too low, not a debt worth carrying further.
MAX_DEBT_S = 3600
# A bucket stamped further in the future than this is not one we wrote: it is treated as full.
_FUTURE_S = 60

_REFILL = f"""
local max_debt_s = {MAX_DEBT_S}
local function refill(bucket, rate, now)
  local raw = redis.call('HMGET', bucket, 'tokens', 'at')
  local tokens, at = tonumber(raw[1]), tonumber(raw[2])
  if tokens == nil or at == nil or tokens ~= tokens or at ~= at or at > now + {_FUTURE_S} then
    return rate
  end
  tokens = math.max(tokens, -rate * max_debt_s)
  return math.min(rate, tokens + math.max(0, now - at) * rate)
end
"""

# KEYS: per target, its in-flight set then its bucket. ARGV: 1 now (s), 2 the job's deadline (s),
# 3 the job id, then per target its max concurrent and its instructions per second ('': no such
# limit). Returns 0 (admitted: the job holds a slot of every target with a concurrency cap) or
# {target number (1-based), limit, what is in use (slots held; tokens left, floored)}. Nothing
# is written unless every check passes.
_ADMIT = (
    _REFILL
    + """
local now, deadline, job = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local n = #KEYS / 2
for i = 1, n do
  local slots, rate = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  if slots then
    local flight = KEYS[2 * i - 1]
    -- A worker that died holding a slot gives it back at the job's deadline.
    redis.call('ZREMRANGEBYSCORE', flight, '-inf', now)
    if not redis.call('ZSCORE', flight, job) then  -- a job delivered again keeps its slot
      local used = redis.call('ZCARD', flight)
      if used >= slots then return {i, 'concurrency', used} end
    end
  end
  if rate then
    local tokens = refill(KEYS[2 * i], rate, now)
    if tokens <= 0 then return {i, 'instructions_per_second', math.floor(tokens)} end
  end
end
local ttl = math.max(1000, math.ceil((deadline - now) * 1000) + 1000)
for i = 1, n do
  if tonumber(ARGV[2 + 2 * i]) then
    local flight = KEYS[2 * i - 1]
    redis.call('ZADD', flight, deadline, job)
    if redis.call('PTTL', flight) < ttl then redis.call('PEXPIRE', flight, ttl) end
  end
end
return 0
"""
)

# KEYS: per target, its in-flight set then its bucket. ARGV: 1 now (s), 2 the job id, then per
# target its instructions per second ('': none, nothing charged) and the instructions to charge.
# The bucket expires once it would be full again (a missing bucket is a full one).
_FINISH = (
    _REFILL
    + """
local now, job = tonumber(ARGV[1]), ARGV[2]
for i = 1, #KEYS / 2 do
  redis.call('ZREM', KEYS[2 * i - 1], job)
  local rate, charge = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i]) or 0
  if rate then
    local bucket = KEYS[2 * i]
    local tokens = math.max(refill(bucket, rate, now) - charge, -rate * max_debt_s)
    redis.call('HSET', bucket, 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', now))
    redis.call('PEXPIRE', bucket, math.ceil((rate - tokens) / rate * 1000) + 1000)
  end
end
return 0
"""
)

# A target as the scripts see it: (app, or "" for the whole shop; max concurrent; instructions
# per second), None where that limit is not set.
Target = tuple[str, int | None, int | None]
# What a finished job charges one target: (app or ""; instructions per second, None: charge
# nothing; instructions).
Charge = tuple[str, int | None, int]


def _limit(value: int | None) -> str:
    return "" if value is None else str(value)


class QuotaScripts:
    """``admit`` and ``finish`` registered on one client (redis-py loads a script again by
    itself when Redis lost it: a restart, a failover)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._keys = keys
        self._admit = client.register_script(_ADMIT)
        self._finish = client.register_script(_FINISH)

    def admit(
        self, shop: str, targets: Sequence[Target], job_id: str, deadline: float, now: float
    ) -> tuple[int, str, int] | None:
        """None if the job was admitted (it now holds a slot of each target with a concurrency
        cap), else (index into ``targets``, the limit it is over, what is in use)."""
        names: list[str] = []
        args: list[str] = [repr(float(now)), repr(float(deadline)), job_id]
        for app, slots, rate in targets:
            names += [self._keys.quota_in_flight(shop, app), self._keys.quota_bucket(shop, app)]
            args += [_limit(slots), _limit(rate)]
        answer = self._admit(keys=names, args=args)
        if not isinstance(answer, list):
            return None
        index, limit, used = answer
        return int(index) - 1, limit.decode() if isinstance(limit, bytes) else str(limit), int(used)

    def finish(self, shop: str, charges: Sequence[Charge], job_id: str, now: float) -> None:
        """Free ``job_id``'s slots and charge each target's bucket what the run used."""
        names: list[str] = []
        args: list[str] = [repr(float(now)), job_id]
        for app, rate, instructions in charges:
            names += [self._keys.quota_in_flight(shop, app), self._keys.quota_bucket(shop, app)]
            args += [_limit(rate), str(max(0, int(instructions)))]
        self._finish(keys=names, args=args)
