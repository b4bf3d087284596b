"""What runs at one (EP, shop): one deployment per app, all of them in one Redis hash.

The hash ``Keys.binding(ep, shop)`` holds a field per app (its deployment as JSON) and a
``#generation`` counter. A reader takes every app's binding with one HGETALL, so a call never
runs a mix of versions; each change is one Lua script that also pushes the replaced deployment
onto that app's history and publishes the invalidation. A binding written before apps existed
(one JSON string) reads as app ``default``, and the first change converts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

from config import REDUCER_APP, Keys
from config.errors import NothingToRollBack, ScriptNotFound, TooManyApps

DEFAULT_APP = "default"
_GENERATION = "#generation"

# Turn a binding from before apps (a string) into the hash it is now.
_UPGRADE = """
if redis.call('TYPE', KEYS[1]).ok == 'string' then
  local legacy = redis.call('GET', KEYS[1])
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'default', legacy)
end
"""

# Bind one app: its version is the one it replaces plus one. A new app is refused (false) when
# the (EP, shop) already has ARGV[5] apps; the reducer app (ARGV[6] = '1') is not counted.
_BIND = (
    _UPGRADE
    + """
local app = ARGV[4]
local current = redis.call('HGET', KEYS[1], app)
if not current and ARGV[6] == '0' then
  local count = 0
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if field ~= '#generation' and field ~= ARGV[7] then count = count + 1 end
  end
  if count >= tonumber(ARGV[5]) then return false end
end
local new = cjson.decode(ARGV[1])
new['version'] = 1
if current then
  new['version'] = cjson.decode(current)['version'] + 1
  redis.call('LPUSH', KEYS[2], current)
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
end
local encoded = cjson.encode(new)
redis.call('HSET', KEYS[1], app, encoded)
redis.call('HINCRBY', KEYS[1], '#generation', 1)
redis.call('PUBLISH', KEYS[3], ARGV[3])
return encoded
"""
)

_ROLLBACK = (
    _UPGRADE
    + """
local previous = redis.call('LPOP', KEYS[2])
if not previous then return false end
redis.call('HSET', KEYS[1], ARGV[2], previous)
redis.call('HINCRBY', KEYS[1], '#generation', 1)
redis.call('PUBLISH', KEYS[3], ARGV[1])
return previous
"""
)

# Unbind one app and drop its history; the hash goes when its last app does.
_UNBIND = (
    _UPGRADE
    + """
local removed = redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
if redis.call('HLEN', KEYS[1]) <= 1 then redis.call('DEL', KEYS[1])
else redis.call('HINCRBY', KEYS[1], '#generation', 1) end
redis.call('PUBLISH', KEYS[3], ARGV[1])
return removed
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

    @classmethod
    def from_json(cls, raw: bytes | str) -> Deployment:
        data = json.loads(raw)
        data["providers"] = tuple((name, sha) for name, sha in data.get("providers") or ())
        return cls(**data)


@dataclass(frozen=True, slots=True)
class BindingSet:
    """Every app's current deployment at one (EP, shop), as one read saw them."""

    apps: dict[str, Deployment]
    generation: int

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
            ],
        )
        if not raw:
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
        return Deployment.from_json(raw)

    def rollback(self, ep: str, shop: str, app: str) -> Deployment:
        raw = self._rollback(keys=self._keys_of(ep, shop, app), args=[self._message(ep, shop), app])
        if not raw:
            raise NothingToRollBack(
                f"no earlier version of {_where(ep, shop, app)} to roll back to", ep=ep, shop=shop, app=app
            )
        return Deployment.from_json(raw)

    def unbind(self, ep: str, shop: str, app: str) -> bool:
        """Remove ``app`` from (EP, shop) with its history; False if it was not bound."""
        return bool(self._unbind(keys=self._keys_of(ep, shop, app), args=[self._message(ep, shop), app]))

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
            if _text(name) != _GENERATION
        }
        if not apps:
            raise ScriptNotFound(f"no script is deployed for {ep}/{shop}", ep=ep, shop=shop)
        return BindingSet(apps, int(fields.get(_GENERATION.encode(), 0)))

    def history(self, ep: str, shop: str, app: str) -> list[Deployment]:
        """Earlier deployments of one app, newest first."""
        return [Deployment.from_json(r) for r in self._redis.lrange(self._keys.history(ep, shop, app), 0, -1)]

    def _keys_of(self, ep: str, shop: str, app: str) -> list[str]:
        return [self._keys.binding(ep, shop), self._keys.history(ep, shop, app), self._keys.invalidations()]

    @staticmethod
    def _message(ep: str, shop: str) -> str:
        return json.dumps({"ep": ep, "shop_id": shop})


def _where(ep: str, shop: str, app: str) -> str:
    return f"{ep}/{shop}" if app == DEFAULT_APP else f"{ep}/{shop} app {app}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
