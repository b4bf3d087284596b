"""What runs at one (EP, shop): one deployment per app, all of them in one Redis hash.

The hash ``Keys.binding(ep, shop)`` holds a field per app (its deployment as JSON), a
``#generation`` counter and, during a rollout, the ``#candidate`` (``scriptpool.registry._rollouts``); no
app name starts with ``#``. A reader takes every app's binding with one HGETALL, so a call never
runs a mix of versions; each change is one Lua script that also pushes the replaced deployment
onto that app's history and publishes the invalidation. A binding written before apps existed
(one JSON string) reads as app ``default``, and the first change converts it.

An app's history (``Keys.history``) keeps its versions that are not live, the most recently live
first, up to ``Keys.HISTORY_DEPTH``. A rollback moves the version it binds out of the history and
the one it replaces into it, so nothing is lost and ``rollback --to`` can go forward again. A
version replaced by a rollback to an earlier one carries ``rolled_back_at``: a plain rollback
(to the newest earlier version) skips it, since an operator rolled away from it. A deploy's
version is one more than any version the app has kept, so a version number names one module.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import redis

from scriptpool.config import Keys, get_logger
from scriptpool.config.errors import ConfigurationError, NothingToRollBack, ScriptNotFound, TooManyApps
from scriptpool.config.extension_points import REDUCER_APP
from scriptpool.registry._candidate import Candidate

log = get_logger("registry")

DEFAULT_APP = "default"
_GENERATION = "#generation"
# A stored query is at most what a deploy accepts: 4 times the highest size cap an EP may set (the
# raw text, comments included, that InputQuery.compile reads).
MAX_INPUT_QUERY_CHARS = 4 * 65_536
CANDIDATE = "#candidate"

# Bind ``new_json`` (a deployment without its version) as ``app``: its version is one more than
# any the app has kept (live or in its history: after a rollback the newer versions are still
# there), and the replaced one goes onto the app's history. Shared by deploy and by a rollout's
# promotion, so both swap the same way.
BIND_APP = """
local function bind_app(key, history, app, new_json, depth)
  local current = redis.call('HGET', key, app)
  local new = cjson.decode(new_json)
  local top = 0
  if current then top = cjson.decode(current)['version'] end
  for _, kept in ipairs(redis.call('LRANGE', history, 0, -1)) do
    top = math.max(top, cjson.decode(kept)['version'])
  end
  new['version'] = top + 1
  if current then
    redis.call('LPUSH', history, current)
    redis.call('LTRIM', history, 0, depth - 1)
  end
  local encoded = cjson.encode(new)
  redis.call('HSET', key, app, encoded)
  redis.call('HINCRBY', key, '#generation', 1)
  return encoded
end
"""

# A deploy, rollback or undeploy of the app a rollout is replacing ends that rollout: its
# candidate was judged against a version that is no longer live. KEYS[4] is the rollout's state,
# KEYS[5] the set of rollouts under way.
_SUPERSEDE = """
local function supersede(app, how, now, retention)
  local raw = redis.call('HGET', KEYS[1], '#candidate')
  if not raw then return 0 end
  local c = cjson.decode(raw)
  if c.app == app then
    redis.call('HDEL', KEYS[1], '#candidate')
    redis.call('SREM', KEYS[5], c.deployment.ep .. '/' .. c.deployment.shop_id)
    local reason = 'superseded by ' .. how .. ' of the live version'
    redis.call('HSET', KEYS[4], 'state', 'aborted', 'reason', reason, 'ended_at', now)
    redis.call('EXPIRE', KEYS[4], retention)
    return 1
  end
  return 0
end
"""

# The apps bound in a binding hash: its fields but the #-named ones (and ``except``, if given).
_COUNT_APPS = """
local function count_apps(key, except)
  local count = 0
  for _, field in ipairs(redis.call('HKEYS', key)) do
    if string.sub(field, 1, 1) ~= '#' and field ~= except then count = count + 1 end
  end
  return count
end
"""

# Turn a binding from before apps (a string) into the hash it is now.
UPGRADE = """
if redis.call('TYPE', KEYS[1]).ok == 'string' then
  local legacy = redis.call('GET', KEYS[1])
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'default', legacy)
end
"""

# Bind one app: its version is the one it replaces plus one. A new app is refused (false) when
# the (EP, shop) already has ARGV[5] apps; the reducer app (ARGV[6] = '1') is not counted.
_BIND = (
    BIND_APP
    + _SUPERSEDE
    + _COUNT_APPS
    + UPGRADE
    + """
local app = ARGV[4]
if redis.call('HEXISTS', KEYS[1], app) == 0 and ARGV[6] == '0' then
  if count_apps(KEYS[1], ARGV[7]) >= tonumber(ARGV[5]) then return false end
end
local superseded = supersede(app, 'a deploy', ARGV[8], tonumber(ARGV[9]))
local encoded = bind_app(KEYS[1], KEYS[2], app, ARGV[1], tonumber(ARGV[2]))
redis.call('PUBLISH', KEYS[3], ARGV[3])
return {encoded, superseded}
"""
)

# Bind a kept version of an app again: version ARGV[5], or ('') the newest version below the live
# one that was not itself rolled back. It leaves the history and the live one enters it (marked
# ``rolled_back_at`` when the move is backwards). ARGV: message, app, now, rollout retention,
# version, depth. Answers {'rolled', live JSON, superseded, replaced version}, {'live', live
# JSON} when that version is live already, {'missing', kept versions as JSON} or {'none'}.
_ROLLBACK = (
    _SUPERSEDE
    + UPGRADE
    + """
local app, now, wanted = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[5])
local current = redis.call('HGET', KEYS[1], app)
if not current then return {'none'} end
local live = cjson.decode(current)['version']
if wanted == live then
  -- Unchanged, but written again: the WAIT a durable write makes after this then vouches for it,
  -- so repeating a rollback --to whose acknowledgement was lost confirms it.
  redis.call('HSET', KEYS[1], app, current)
  return {'live', current}
end
local target, target_version = nil, nil
local kept = {}
for _, item in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local d = cjson.decode(item)
  table.insert(kept, d['version'])
  local skipped = d['rolled_back_at'] ~= nil and d['rolled_back_at'] ~= cjson.null
  if wanted ~= nil then
    if d['version'] == wanted then target, target_version = item, d['version'] end
  elseif d['version'] < live and not skipped and (target == nil or d['version'] > target_version) then
    target, target_version = item, d['version']
  end
end
if not target then return {'missing', cjson.encode(kept)} end
local superseded = supersede(app, 'a rollback', ARGV[3], tonumber(ARGV[4]))
redis.call('LREM', KEYS[2], 1, target)
local replaced = current
if target_version < live then
  local d = cjson.decode(current)
  d['rolled_back_at'] = now
  replaced = cjson.encode(d)
end
redis.call('LPUSH', KEYS[2], replaced)
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[6]) - 1)
local chosen = cjson.decode(target)
if chosen['rolled_back_at'] ~= nil then
  chosen['rolled_back_at'] = nil
  target = cjson.encode(chosen)
end
redis.call('HSET', KEYS[1], app, target)
redis.call('HINCRBY', KEYS[1], '#generation', 1)
redis.call('PUBLISH', KEYS[3], ARGV[1])
return {'rolled', target, superseded, live}
"""
)

# Unbind one app and drop its history; the hash goes when its last app does.
_UNBIND = (
    _SUPERSEDE
    + _COUNT_APPS
    + UPGRADE
    + """
local superseded = supersede(ARGV[2], 'an undeploy', ARGV[3], tonumber(ARGV[4]))
local removed = redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
if count_apps(KEYS[1]) == 0 then redis.call('DEL', KEYS[1])
else redis.call('HINCRBY', KEYS[1], '#generation', 1) end
redis.call('PUBLISH', KEYS[3], ARGV[1])
return {removed, superseded}
"""
)


@dataclass(frozen=True, slots=True)
class Deployment:
    """What runs for one app at one (extension point, shop): a module version and its entry."""

    ep: str
    shop_id: str
    sha256: str
    export: str
    version: int
    providers: tuple[tuple[str, str], ...]  # (import-module name, provider sha256), pinned at deploy
    stack_bytes: int
    deployed_at: float
    app: str = DEFAULT_APP
    block_on_failure: bool = False  # if this app's script fails, the whole call fails
    # "json" or "msgpack", read from the imports at deploy (bindings from before it say nothing:
    # they are JSON).
    codec: str = "json"
    # Set only on a kept version that a rollback to an earlier one replaced (when): a plain
    # rollback skips it. A live binding never carries it.
    rolled_back_at: float | None = None
    # The script's input query as deployed (GraphQL text against the EP's input_graphql), or None:
    # the script gets the whole input. Bindings from before input queries have none.
    input_query: str | None = None

    def __post_init__(self) -> None:
        # Read back from Redis: a query that is not text fails by name, not in the GraphQL parser.
        query = self.input_query
        if query is not None and (not isinstance(query, str) or len(query) > MAX_INPUT_QUERY_CHARS):
            shown = repr(query)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise ConfigurationError(
                f"the input query of {self.ep}/{self.shop_id} app {self.app} must be GraphQL text of at "
                f"most {MAX_INPUT_QUERY_CHARS:,} characters, got {shown}",
                ep=self.ep,
                shop=self.shop_id,
                app=self.app,
            )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Deployment:
        data = json.loads(raw)
        data["providers"] = tuple((name, sha) for name, sha in data.get("providers") or ())
        return cls(**data)


@dataclass(frozen=True, slots=True)
class BindingSet:
    """Every app's current deployment at one (EP, shop), as one read saw them, with the
    rollout's candidate if one is under way."""

    apps: dict[str, Deployment]
    generation: int
    candidate: Candidate | None = None
    # The candidate's apps, read once with the rest (a shadow run of every call uses them).
    candidate_apps: dict[str, Deployment] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def read(cls, apps: dict[str, Deployment], generation: int, candidate: Candidate | None) -> BindingSet:
        """The set, with the candidate's apps worked out if there is a candidate."""
        if candidate is None:
            return cls(apps, generation)
        deployment = Deployment.from_json(json.dumps(candidate.deployment))
        return cls(apps, generation, candidate, {**apps, candidate.app: deployment})

    def with_candidate(self) -> BindingSet:
        """These apps with the candidate in its app's place: what a shadow or canary run runs."""
        assert self.candidate_apps is not None
        return BindingSet(self.candidate_apps, self.generation)

    def contributors(self) -> list[Deployment]:
        """The apps whose scripts a call runs, in app order (by name); the reducer is not one."""
        return [self.apps[name] for name in sorted(self.apps) if name != REDUCER_APP]

    @property
    def reducer(self) -> Deployment | None:
        return self.apps.get(REDUCER_APP)

    def only(self) -> Deployment:
        """The one deployment of a single-script EP."""
        if len(self.apps) == 1:
            return next(iter(self.apps.values()))
        return self.apps.get(DEFAULT_APP) or self.contributors()[0]


class Bindings:
    """Binds, rolls back, unbinds and reads the deployments of (EP, shop, app) in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys
        self._bind = client.register_script(_BIND)
        self._rollback = client.register_script(_ROLLBACK)
        self._unbind = client.register_script(_UNBIND)

    def bind(self, template: dict[str, object], *, max_apps: int) -> Deployment:
        """Bind ``template`` (a deployment without its version) as its app's current script."""
        ep, shop, app = str(template["ep"]), str(template["shop_id"]), str(template["app"])
        raw = self._bind(
            keys=self._keys_of(ep, shop, app),
            args=[
                json.dumps(template),
                Keys.HISTORY_DEPTH,
                self._message(ep, shop),
                app,
                max_apps,
                "1" if app == REDUCER_APP else "0",
                REDUCER_APP,
                time.time(),
                Keys.ROLLOUT_RETENTION_S,
            ],
        )
        if not raw:  # the script's false: nothing bound
            raise TooManyApps(
                f"{ep}/{shop} already binds {max_apps} app(s), the most its extension point allows"
                + (
                    " (it runs one script: define it with --combine join or chain for several)"
                    if max_apps == 1
                    else ""
                ),
                ep=ep,
                shop=shop,
                limit=max_apps,
            )
        encoded, superseded = raw
        _log_superseded(superseded, ep, shop, app, "a deploy")
        return Deployment.from_json(encoded)

    def rollback(self, ep: str, shop: str, app: str, to: int | None = None) -> tuple[Deployment, int]:
        """Bind version ``to`` of ``app`` again (earlier or later than the live one), or by
        default the newest version below the live one that was not itself rolled back. Returns
        the deployment now live and the version it replaced (the same one if ``to`` was live)."""
        raw = self._rollback(
            keys=self._keys_of(ep, shop, app),
            args=[
                self._message(ep, shop),
                app,
                time.time(),
                Keys.ROLLOUT_RETENTION_S,
                "" if to is None else to,
                Keys.HISTORY_DEPTH,
            ],
        )
        answer = _text(raw[0])
        where = _where(ep, shop, app)
        if answer == "none":
            raise NothingToRollBack(f"nothing is deployed to {where}", ep=ep, shop=shop, app=app)
        if answer == "live":
            live = Deployment.from_json(raw[1])
            return live, live.version
        if answer == "missing":
            kept = sorted(int(v) for v in json.loads(raw[1]))
            listed = ", ".join(map(str, kept)) or "none"
            if to is None:
                message = (
                    f"no earlier version of {where} to roll back to (versions kept besides the live "
                    f"one: {listed}; a version that was rolled back is skipped: name it with --to)"
                )
            else:
                message = f"version {to} of {where} is not kept (kept besides the live one: {listed})"
            raise NothingToRollBack(message, ep=ep, shop=shop, app=app, version=to, kept=kept)
        _, encoded, superseded, replaced = raw
        _log_superseded(int(superseded), ep, shop, app, "a rollback")
        return Deployment.from_json(encoded), int(replaced)

    def unbind(self, ep: str, shop: str, app: str) -> bool:
        """Remove ``app`` from (EP, shop) with its history; False if it was not bound."""
        removed, superseded = self._unbind(
            keys=self._keys_of(ep, shop, app),
            args=[self._message(ep, shop), app, time.time(), Keys.ROLLOUT_RETENTION_S],
        )
        _log_superseded(superseded, ep, shop, app, "an undeploy")
        return bool(removed)

    def read(self, ep: str, shop: str) -> BindingSet:
        """Every app's deployment in one read, or :class:`ScriptNotFound` if there is none."""
        key = self._keys.binding(ep, shop)
        try:
            fields = self._redis.hgetall(key)
        except redis.ResponseError:  # WRONGTYPE: a binding from before apps
            legacy = self._redis.get(key)
            fields = {DEFAULT_APP.encode(): legacy} if legacy is not None else {}
        apps = {
            _text(name): Deployment.from_json(value)
            for name, value in fields.items()
            if not _text(name).startswith("#")
        }
        if not apps:
            raise ScriptNotFound(f"no script is deployed for {ep}/{shop}", ep=ep, shop=shop)
        candidate = fields.get(CANDIDATE.encode())
        generation = int(fields.get(_GENERATION.encode(), 0))
        return BindingSet.read(apps, generation, Candidate.from_json(candidate) if candidate else None)

    def history(self, ep: str, shop: str, app: str) -> list[Deployment]:
        """The kept versions of one app that are not live, the most recently live first."""
        return [Deployment.from_json(r) for r in self._redis.lrange(self._keys.history(ep, shop, app), 0, -1)]

    def _keys_of(self, ep: str, shop: str, app: str) -> list[str]:
        return [
            self._keys.binding(ep, shop),
            self._keys.history(ep, shop, app),
            self._keys.invalidations(),
            self._keys.rollout(ep, shop),
            self._keys.rollouts_under_way(),
        ]

    @staticmethod
    def _message(ep: str, shop: str) -> str:
        return json.dumps({"ep": ep, "shop_id": shop})


def _where(ep: str, shop: str, app: str) -> str:
    return f"{ep}/{shop}" if app == DEFAULT_APP else f"{ep}/{shop} app {app}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _log_superseded(superseded: int, ep: str, shop: str, app: str, how: str) -> None:
    if superseded:
        log.info(
            "rollout_aborted", ep=ep, shop=shop, app=app, reason=f"superseded by {how} of the live version"
        )
