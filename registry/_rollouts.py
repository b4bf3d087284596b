"""Verified rollouts: a candidate beside the live version, compared on shadow runs, promoted or
aborted by its rules, in one atomic step each.

The candidate sits in the binding hash (``#candidate``), so a call reads it with the live apps;
its counts sit in ``Keys.rollout`` (a hash, kept a while after the rollout ends for ``status``)
and its mismatch samples in ``Keys.rollout_samples``. Every change is a Lua script: a worker's
comparison is counted and judged in the same step, and promotion binds the candidate with the
same swap as a deploy (``scriptpool.registry._bindings.BIND_APP``), so history and rollback work as after a
deploy, and every worker hears of it on the invalidation channel.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from scriptpool.config import Keys, get_logger
from scriptpool.config.errors import InvalidArgument, RolloutConflict, ScriptNotFound
from scriptpool.registry._bindings import BIND_APP, UPGRADE
from scriptpool.registry._candidate import ABORTED, CANARY, PROMOTED, SHADOWING, Candidate, RolloutRules

# What a comparison found: outputs, statuses and codes equal, or not; or the candidate failed
# where the live version did not (which aborts at once).
MATCH, MISMATCH, CANDIDATE_ERROR = "match", "mismatch", "candidate_error"

log = get_logger("registry")

# Shared by every script: end the rollout (KEYS: binding, stats, history, channel, under way).
_FINISH = (
    BIND_APP
    + """
local function finish(c, state, reason, now, depth, message, retention)
  if state == 'promoted' then
    bind_app(KEYS[1], KEYS[3], c.app, cjson.encode(c.deployment), depth)
  else
    redis.call('HINCRBY', KEYS[1], '#generation', 1)
  end
  redis.call('HDEL', KEYS[1], '#candidate')
  redis.call('SREM', KEYS[5], c.deployment.ep .. '/' .. c.deployment.shop_id)
  redis.call('HSET', KEYS[2], 'state', state, 'reason', reason, 'ended_at', now)
  redis.call('EXPIRE', KEYS[2], retention)
  redis.call('PUBLISH', KEYS[4], message)
  return state
end
local function current(id)
  local raw = redis.call('HGET', KEYS[1], '#candidate')
  if not raw then return nil end
  local c = cjson.decode(raw)
  if id ~= '' and c.id ~= id then return nil end
  return c
end
"""
)

# ARGV: candidate JSON, now, message, retention, id, app, sha256, 'EP/shop'.
_START = (
    UPGRADE
    + """
if redis.call('HEXISTS', KEYS[1], ARGV[6]) == 0 then return 'no_live' end
if redis.call('HEXISTS', KEYS[1], '#candidate') == 1 then return 'busy' end
redis.call('HSET', KEYS[1], '#candidate', ARGV[1])
redis.call('HINCRBY', KEYS[1], '#generation', 1)
redis.call('SADD', KEYS[5], ARGV[8])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[2], 'id', ARGV[5], 'state', 'shadowing', 'app', ARGV[6], 'sha256', ARGV[7],
  'started_at', ARGV[2], 'updated_at', ARGV[2], 'compared', 0, 'match', 0, 'mismatch', 0,
  'candidate_error', 0)
redis.call('PUBLISH', KEYS[4], ARGV[3])
return 'started'
"""
)

# What a judge saw since it last reported (``Tally``), counted and judged in one step.
# ARGV: id, now, depth, message, retention, matches, mismatches, candidate errors, instructions
# delta sum, peak memory delta sum, the first candidate error's code, canary calls, canary
# errors, live calls, live errors (both in the canary), samples kept, their TTL, then the
# disagreements' samples (JSON). KEYS[6]: the samples.
_REPORT = (
    _FINISH
    + """
local c = current(ARGV[1])
if not c then return 'stale' end
local now, depth, message, retention = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local new_match, new_mismatch, new_error = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
if #ARGV >= 18 then
  for i = 18, #ARGV do redis.call('LPUSH', KEYS[6], ARGV[i]) end
  redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[16]) - 1)
  redis.call('EXPIRE', KEYS[6], tonumber(ARGV[17]))
end
local n = new_match + new_mismatch + new_error
if n > 0 then
  redis.call('HINCRBY', KEYS[2], 'compared', n)
  redis.call('HINCRBY', KEYS[2], 'match', new_match)
  redis.call('HINCRBY', KEYS[2], 'mismatch', new_mismatch)
  redis.call('HINCRBY', KEYS[2], 'candidate_error', new_error)
  redis.call('HINCRBYFLOAT', KEYS[2], 'instructions_delta_sum', ARGV[9])
  redis.call('HINCRBYFLOAT', KEYS[2], 'peak_memory_delta_sum', ARGV[10])
end
redis.call('HSET', KEYS[2], 'updated_at', now)
local compared = tonumber(redis.call('HGET', KEYS[2], 'compared') or '0')
local mismatches = tonumber(redis.call('HGET', KEYS[2], 'mismatch') or '0')
local rules = c.rules
if new_error > 0 then
  return finish(c, 'aborted', 'the candidate failed (' .. ARGV[11] .. ') where the live version did not',
    now, depth, message, retention)
end
if mismatches > rules.max_mismatch_rate * rules.promote_after then
  return finish(c, 'aborted', string.format(
    '%d mismatch(es) in %d compared runs: more than a rate of %g allows', mismatches, compared,
    rules.max_mismatch_rate), now, depth, message, retention)
end
if c.state == 'canary' then
  redis.call('HINCRBY', KEYS[2], 'canary_calls', ARGV[12])
  redis.call('HINCRBY', KEYS[2], 'canary_errors', ARGV[13])
  redis.call('HINCRBY', KEYS[2], 'live_calls', ARGV[14])
  redis.call('HINCRBY', KEYS[2], 'live_errors', ARGV[15])
  local cc = tonumber(redis.call('HGET', KEYS[2], 'canary_calls'))
  local ce = tonumber(redis.call('HGET', KEYS[2], 'canary_errors'))
  local lc = tonumber(redis.call('HGET', KEYS[2], 'live_calls'))
  local le = tonumber(redis.call('HGET', KEYS[2], 'live_errors'))
  local live_rate = 0
  if lc > 0 then live_rate = le / lc end
  if cc > 0 and cc >= math.min(10, rules.canary_calls) and ce / cc - live_rate > rules.max_error_increase then
    return finish(c, 'aborted', string.format('canary error rate %.3f against the live %.3f: over +%g',
      ce / cc, live_rate, rules.max_error_increase), now, depth, message, retention)
  end
  if cc >= rules.canary_calls then
    return finish(c, 'promoted', string.format(
      'canary served %d calls, %d error(s); live %d, %d', cc, ce, lc, le), now, depth, message, retention)
  end
  return 'counted'
end
if compared >= rules.promote_after then
  if rules.canary_percent > 0 then
    c.state = 'canary'
    redis.call('HSET', KEYS[1], '#candidate', cjson.encode(c))
    redis.call('HINCRBY', KEYS[1], '#generation', 1)
    redis.call('HSET', KEYS[2], 'state', 'canary', 'canary_calls', 0, 'canary_errors', 0, 'live_calls', 0,
      'live_errors', 0)
    redis.call('PUBLISH', KEYS[4], message)
    return 'canary'
  end
  return finish(c, 'promoted', string.format('%d compared runs, %d mismatch(es)', compared, mismatches),
    now, depth, message, retention)
end
return 'counted'
"""
)

# A human decision. ARGV: state ('promoted' or 'aborted'), reason, now, depth, message, retention.
_DECIDE = (
    _FINISH
    + """
local c = current('')
if not c then return 'none' end
return finish(c, ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]))
"""
)


@dataclass(slots=True)
class Tally:
    """What a judge saw of one rollout since it last reported: comparisons by result, their
    cost deltas, the disagreements' samples, and during the canary the calls each version
    served and how many failed."""

    match: int = 0
    mismatch: int = 0
    candidate_error: int = 0
    instructions_delta: float = 0.0
    peak_memory_delta: float = 0.0
    error_code: str = ""  # the first candidate error's
    samples: list[dict[str, Any]] = field(default_factory=list)
    canary_calls: int = 0
    canary_errors: int = 0
    live_calls: int = 0
    live_errors: int = 0

    def __len__(self) -> int:
        return self.match + self.mismatch + self.candidate_error + self.canary_calls + self.live_calls


@dataclass(frozen=True, slots=True)
class RolloutStatus:
    """A rollout's state (shadowing, canary, promoted, aborted), why it ended, its counts and
    the inputs on which candidate and live version disagreed."""

    ep: str
    shop: str
    app: str
    state: str
    reason: str
    counts: dict[str, float]  # the counts of runs and calls as ints; times and delta sums as floats
    sha256: str
    samples: list[dict[str, Any]]


class Rollouts:
    """Starts, judges, promotes and aborts the rollouts of a registry's Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys
        self._start = client.register_script(_START)
        self._report = client.register_script(_REPORT)
        self._decide = client.register_script(_DECIDE)

    def start(self, template: dict[str, Any], rules: RolloutRules) -> Candidate:
        """Put ``template`` (a deployment a deploy would bind) beside its app's live version."""
        ep, shop, app = str(template["ep"]), str(template["shop_id"]), str(template["app"])
        candidate = Candidate(os.urandom(8).hex(), app, template, rules, SHADOWING, time.time())
        answer = _text(
            self._start(
                keys=self._keys_of(ep, shop, app, samples=True),
                args=[
                    candidate.to_json(),
                    candidate.started_at,
                    self._message(ep, shop),
                    Keys.ROLLOUT_RETENTION_S,
                    candidate.id,
                    app,
                    template["sha256"],
                    f"{ep}/{shop}",
                ],
            )
        )
        if answer == "no_live":
            raise ScriptNotFound(
                f"app {app!r} has no live script at {ep}/{shop}: a rollout replaces one (deploy it first)",
                app=app,
            )
        if answer == "busy":
            raise RolloutConflict(
                f"{ep}/{shop} already has a rollout under way: see `scriptpool rollout status {ep} {shop}`, "
                "or promote or abort it first",
                ep=ep,
                shop=shop,
            )
        return candidate

    def report(self, ep: str, shop: str, candidate: Candidate, tally: Tally) -> str:
        """Count what a judge saw (comparisons, canary calls, disagreements) and apply the
        rules, in one step: 'counted', 'canary', 'promoted', 'aborted', or 'stale' (the rollout
        it belonged to is over)."""
        return _text(
            self._report(
                keys=[*self._keys_of(ep, shop, candidate.app), self._keys.rollout_samples(ep, shop)],
                args=[
                    candidate.id,
                    time.time(),
                    Keys.HISTORY_DEPTH,
                    self._message(ep, shop),
                    Keys.ROLLOUT_RETENTION_S,
                    tally.match,
                    tally.mismatch,
                    tally.candidate_error,
                    tally.instructions_delta,
                    tally.peak_memory_delta,
                    tally.error_code,
                    tally.canary_calls,
                    tally.canary_errors,
                    tally.live_calls,
                    tally.live_errors,
                    Keys.ROLLOUT_SAMPLES,
                    Keys.ROLLOUT_SAMPLES_TTL_S,
                    *(json.dumps(sample) for sample in tally.samples[-Keys.ROLLOUT_SAMPLES :]),
                ],
            )
        )

    def decide(self, ep: str, shop: str, state: str, reason: str) -> str:
        """Promote or abort by hand; the state it ended in."""
        if state not in (PROMOTED, ABORTED):
            raise InvalidArgument(f"a rollout ends promoted or aborted, not {state!r}")
        raw = self._redis.hget(self._keys.binding(ep, shop), "#candidate")
        if raw is None:
            raise ScriptNotFound(f"{ep}/{shop} has no rollout under way", ep=ep, shop=shop)
        app = Candidate.from_json(raw).app
        answer = _text(
            self._decide(
                keys=self._keys_of(ep, shop, app),
                args=[
                    state,
                    reason,
                    time.time(),
                    Keys.HISTORY_DEPTH,
                    self._message(ep, shop),
                    Keys.ROLLOUT_RETENTION_S,
                ],
            )
        )
        if answer == "none":
            raise ScriptNotFound(f"{ep}/{shop} has no rollout under way", ep=ep, shop=shop)
        log.info(f"rollout_{answer}", ep=ep, shop=shop, app=app, reason=reason)
        return answer

    def status(self, ep: str, shop: str) -> RolloutStatus:
        """The current or last rollout at (``ep``, ``shop``), or :class:`ScriptNotFound`."""
        fields = {_text(k): _text(v) for k, v in self._redis.hgetall(self._keys.rollout(ep, shop)).items()}
        if not fields:
            raise ScriptNotFound(f"{ep}/{shop} has had no rollout (in the last week)", ep=ep, shop=shop)
        counts = {
            k: int(v) if k in _COUNTED else float(v) for k, v in fields.items() if k not in _TEXT_FIELDS
        }
        samples = [json.loads(raw) for raw in self._redis.lrange(self._keys.rollout_samples(ep, shop), 0, -1)]
        return RolloutStatus(
            ep, shop, fields.get("app", ""), fields.get("state", ""), fields.get("reason", ""), counts,
            fields.get("sha256", ""), samples,
        )  # fmt: skip

    def under_way(self) -> list[RolloutStatus]:
        """Every rollout still shadowing or in its canary."""
        found = []
        for member in sorted(_text(m) for m in self._redis.smembers(self._keys.rollouts_under_way())):
            ep, _, shop = member.partition("/")
            try:
                found.append(self.status(ep, shop))
            except ScriptNotFound:  # its state expired: only a crash between steps leaves that
                continue
        return [status for status in found if status.state in (SHADOWING, CANARY)]

    def _keys_of(self, ep: str, shop: str, app: str, *, samples: bool = False) -> list[str]:
        third = self._keys.rollout_samples(ep, shop) if samples else self._keys.history(ep, shop, app)
        return [
            self._keys.binding(ep, shop),
            self._keys.rollout(ep, shop),
            third,
            self._keys.invalidations(),
            self._keys.rollouts_under_way(),
        ]

    @staticmethod
    def _message(ep: str, shop: str) -> str:
        return json.dumps({"ep": ep, "shop_id": shop})


_TEXT_FIELDS = frozenset({"id", "state", "app", "sha256", "reason"})
# Counts of runs and calls: whole numbers (HINCRBY). The rest are times and sums of deltas.
_COUNTED = frozenset(
    {
        "compared",
        "match",
        "mismatch",
        "candidate_error",
        "canary_calls",
        "canary_errors",
        "live_calls",
        "live_errors",
    }
)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
