"""``scriptpool status``: every shard group's Redis, shards, live workers and queue depths, the
script data it holds, the quotas set there, and whether every group holds every extension point
and provider."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

import redis

from scriptpool.cli._output import ExitCode, print_json
from scriptpool.cli._query_text import summary_text
from scriptpool.config import Settings, ShardGroup
from scriptpool.config.errors import BrokerUnavailable
from scriptpool.config.heartbeats import WorkerHeartbeat, live_workers, shard_count_disagreement
from scriptpool.config.quotas import TargetUsage, all_quotas, usage_now
from scriptpool.config.redis import describe_redis_url, redis_client, redis_failure
from scriptpool.config.store import DataSizes, data_sizes

_TRANSPORT = (redis.ConnectionError, redis.TimeoutError, OSError)
# The shops with quotas whose usage status reads, per group (the rest are counted only), and the
# busiest targets it names in text.
_QUOTA_SHOPS_READ = 1000
_BUSIEST = 5


@dataclass
class GroupView:
    """What one group's Redis says, or why it said nothing."""

    group: ShardGroup
    error: str | None = None
    failure: str = ""  # the error in words (cannot reach it, or it wants a password), if any
    beats: list[WorkerHeartbeat] = field(default_factory=list)
    depths: dict[int, int] = field(default_factory=dict)
    extension_points: dict[str, str] = field(default_factory=dict)  # name -> definition JSON
    providers: dict[str, str] = field(default_factory=dict)  # name -> module sha256
    rollouts: list[dict[str, Any]] = field(default_factory=list)  # under way
    data: DataSizes | None = None  # script data held (README, Script data and sessions)
    quota_shops: int = 0  # shops with a quota (README, Quotas)
    quotas: list[TargetUsage] = field(default_factory=list)  # of the first _QUOTA_SHOPS_READ

    @property
    def reachable(self) -> bool:
        return self.error is None


def read_group(settings: Settings, group: ShardGroup, *, definitions: bool) -> GroupView:
    """One round of reads on ``group``'s Redis; a Redis that does not answer is noted, not raised
    (other groups still have something to say). A ``ResponseError`` (a database Redis lacks)
    propagates: that is a configuration mistake, not an outage."""
    keys = settings.keys
    view = GroupView(group)
    client = redis_client(group.url, timeout=5, connect_timeout=2)
    try:
        view.beats = live_workers(client, keys)
        with client.pipeline(transaction=False) as pipe:
            for shard in group.shards:
                pipe.llen(keys.queue(shard))
            view.depths = dict(zip(group.shards, (int(n) for n in pipe.execute()), strict=True))
        if definitions:
            names = sorted(_text(n) for n in client.smembers(keys.extension_points()))
            raws = client.mget([keys.extension_point(name) for name in names]) if names else []
            view.extension_points = {n: _text(raw) for n, raw in zip(names, raws, strict=True) if raw}
            providers = sorted(_text(n) for n in client.smembers(keys.providers()))
            raws = client.mget([keys.provider(name) for name in providers]) if providers else []
            for name, raw in zip(providers, raws, strict=True):
                if raw:
                    view.providers[name] = str(json.loads(raw).get("sha256", ""))
        view.rollouts = _rollouts_under_way(client, settings)
        view.data = data_sizes(client, keys)
        try:
            view.quota_shops = int(client.scard(keys.quota_shops()))
            if view.quota_shops:
                view.quotas = usage_now(client, keys, all_quotas(client, keys, most=_QUOTA_SHOPS_READ))
        except redis.ResponseError:  # a key of another type where ours go: the rest still shows
            view.quota_shops, view.quotas = 0, []
    except _TRANSPORT as exc:
        view.error = str(exc)
        view.failure = redis_failure(f"at {describe_redis_url(group.url)}", exc)
    finally:
        client.close()
    return view


def _rollouts_under_way(client: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    if not client.scard(settings.keys.rollouts_under_way()):
        return []  # the usual case, said without loading the registry (wasmtime and all)
    from scriptpool.registry import Rollouts

    return [
        {
            "ep": r.ep,
            "shop": r.shop,
            "app": r.app,
            "state": r.state,
            "compared": int(r.counts.get("compared", 0)),
            "mismatch": int(r.counts.get("mismatch", 0)),
        }
        for r in Rollouts(client, settings.keys).under_way()
    ]


def registry_gaps(views: list[GroupView]) -> list[dict[str, Any]]:
    """Per reachable group: the extension points and providers some other group has and it
    lacks, or holds in another version. ``ep define`` and ``providers add`` write to every
    group, so running them again heals each gap."""
    reachable = [v for v in views if v.reachable]
    gaps: list[dict[str, Any]] = []
    for kind, attribute in (("extension point", "extension_points"), ("provider", "providers")):
        every: dict[str, set[str]] = {}
        for view in reachable:
            for name, version in getattr(view, attribute).items():
                every.setdefault(name, set()).add(version)
        for view in reachable:
            held: dict[str, str] = getattr(view, attribute)
            for name in sorted(every):
                if name not in held:
                    gaps.append({"group": view.group.name, "kind": kind, "name": name, "problem": "missing"})
                elif len(every[name]) > 1:
                    gaps.append({"group": view.group.name, "kind": kind, "name": name, "problem": "differs"})
    return gaps


def _heal_command(gap: dict[str, Any]) -> str:
    if gap["kind"] == "provider":
        return f"scriptpool providers add {gap['name']} MODULE"
    return f"scriptpool ep define {gap['name']} ..."


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    several = len(settings.groups) > 1
    views = [read_group(settings, group, definitions=several) for group in settings.groups]
    down = [v for v in views if not v.reachable]
    if len(down) == len(views):
        raise BrokerUnavailable("; ".join(view.failure for view in down))
    beats = [beat for view in views for beat in view.beats]
    mismatch = shard_count_disagreement(beats, settings.shards)
    view_of = {shard: view for view in views for shard in view.group.shards}
    shards: list[dict[str, Any]] = []
    for shard in range(settings.shards):
        view = view_of[shard]
        serving = [b for b in view.beats if shard in b.shards and b.shard_count in (0, settings.shards)]
        shards.append(
            {
                "shard": shard,
                "group": view.group.name,
                "queue_depth": view.depths.get(shard),
                "workers": [b.name for b in serving],
            }
        )
    unserved = [s["shard"] for s in shards if not s["workers"]]
    gaps = registry_gaps(views)
    pair = _pair_status(args, settings, shards) if args.ep else None
    rollouts = [rollout for view in views for rollout in view.rollouts]
    if down:
        exit_code = ExitCode.UNREACHABLE
    elif unserved or mismatch or gaps:
        exit_code = ExitCode.FALLBACK
    else:
        exit_code = ExitCode.OK
    if args.json:
        print_json(
            {
                "redis": describe_redis_url(settings.groups[0].url) if not several else None,
                "shards": settings.shards,
                "groups": [
                    {
                        "group": v.group.name,
                        "redis": describe_redis_url(v.group.url),
                        "shards": list(v.group.shards),
                        "reachable": v.reachable,
                        "error": v.error,
                        "live_workers": len(v.beats),
                        "data": _data(v.data),
                    }
                    for v in views
                ],
                "shard_table": shards,
                "unserved_shards": unserved,
                "shard_count_mismatch": {str(count): names for count, names in mismatch.items()},
                "registry_gaps": gaps,
                "workers": [_beat(b) for b in beats],
                "rollouts": rollouts,
                "quotas": {
                    "shops": sum(v.quota_shops for v in views),
                    "targets": [{"group": v.group.name, **u.as_dict()} for v in views for u in v.quotas],
                },
                **({"binding": pair} if pair is not None else {}),
            }
        )
        return exit_code
    _print_table(settings, views, shards, beats, several)
    if pair is not None:
        workers = ", ".join(pair["workers"]) or "NONE"
        print(f"\n{pair['ep']}/{pair['shop']} ({pair['combine']}): shard {pair['shard']}, workers {workers}")
        for app in pair["apps"]:
            blocking = ", blocks on failure" if app["block_on_failure"] else ""
            query = summary_text(app["input_query"]) or "none (the whole input)"
            print(
                f"  app {app['app']}: version {app['version']} (sha256 {app['sha256'][:12]}){blocking}, "
                f"input query {query}"
            )
        if not pair["apps"]:
            print("  nothing deployed")
    for view in views:
        if view.data is not None and (view.data.shops or view.data.apps):
            d = view.data
            where = f"group {view.group.name}: " if several else ""
            more = "" if d.complete else " (at least: counted up to a bound)"
            print(
                f"{where}script data: {d.shops:,} shop(s) hold {d.shop_bytes:,} bytes of SHOP and SESSION "
                f"data; {d.apps:,} app(s) hold {d.app_keys:,} APP key(s){more}"
            )
    _print_quotas(views)
    for rollout in rollouts:
        print(
            f"rollout at {rollout['ep']}/{rollout['shop']} (app {rollout['app']}): {rollout['state']}, "
            f"{rollout['compared']} compared, {rollout['mismatch']} mismatch(es)"
        )
    for count, names in sorted(mismatch.items()):
        print(
            f"warning: {len(names)} live worker(s) run with SCRIPTPOOL_SHARDS={count}, this status with "
            f"{settings.shards}: {', '.join(names)}. Every process must agree, or calls time out."
        )
    for gap in gaps:
        how = "lacks" if gap["problem"] == "missing" else "holds another version of"
        print(
            f"warning: group {gap['group']} {how} {gap['kind']} {gap['name']}: its shops' calls to it "
            f"fall back or run differently; run `{_heal_command(gap)}` again (it writes to every group)"
        )
    return exit_code


def _pair_status(
    args: argparse.Namespace, settings: Settings, shards: list[dict[str, Any]]
) -> dict[str, Any]:
    """Where one (EP, shop) runs, and every app's script bound there."""
    from scriptpool.cli._query_text import query_summary
    from scriptpool.cli._registries import open_registries
    from scriptpool.config import shard_for
    from scriptpool.config.errors import InvalidArgument, ScriptNotFound

    if args.shop is None:
        raise InvalidArgument("status EP SHOP: give both, or neither")
    registry = open_registries(settings).reader_for_shop(args.shop)
    definition = registry.extension_point(args.ep)
    shard = shard_for(args.shop, settings.shards)
    try:
        apps = registry.bindings(args.ep, str(args.shop)).apps
    except ScriptNotFound:
        apps = {}
    return {
        "ep": args.ep,
        "shop": str(args.shop),
        "combine": definition.combine,
        "shard": shard,
        "workers": shards[shard]["workers"],
        "apps": [
            {
                "app": name,
                "version": d.version,
                "sha256": d.sha256,
                "block_on_failure": d.block_on_failure,
                "deployed_at": d.deployed_at,
                "input_query": query_summary(d.input_query, definition, full=True),
            }
            for name, d in sorted(apps.items())
        ],
    }


def _print_table(
    settings: Settings,
    views: list[GroupView],
    shards: list[dict[str, Any]],
    beats: list[WorkerHeartbeat],
    several: bool,
) -> None:
    from scriptpool.cli._table import LiveTable

    if several:
        print(f"shards {settings.shards}  groups {len(views)}  live workers {len(beats)}")
        for view in views:
            state = "ok" if view.reachable else view.failure
            print(f"group {view.group.name}  redis {describe_redis_url(view.group.url)}  {state}")
    else:
        where = describe_redis_url(views[0].group.url)
        print(f"redis {where}  shards {settings.shards}  live workers {len(beats)}")
    columns = [("shard", 5), ("queue depth", 11), ("worker", 36), ("executed", 9), ("dropped", 7)]
    columns += [("modules", 7), ("cache hit %", 11), ("data hit %", 10)]
    if several:
        columns.insert(1, ("group", 9))
    table = LiveTable(columns)
    by_name = {b.name: b for b in beats}
    reachable = {v.group.name: v.reachable for v in views}
    for row in shards:
        lead: list[Any] = [row["shard"], row["group"]] if several else [row["shard"]]
        if not reachable[row["group"]]:
            table.row(*lead, None, "NONE: its Redis is unreachable", None, None, None, None, None)
            continue
        if not row["workers"]:
            table.row(*lead, row["queue_depth"], "NONE: callers get fallbacks", None, None, None, None, None)
        for name in row["workers"]:
            beat = by_name[name]
            lookups = beat.cache.get("hits", 0) + beat.cache.get("misses", 0)
            ratio = 100.0 * beat.cache.get("hits", 0) / lookups if lookups else None
            table.row(
                *lead,
                row["queue_depth"],
                name,
                beat.executed,
                beat.dropped_stale,
                beat.cache.get("entries"),
                ratio,
                None if (data := beat.store_hit_ratio()) is None else 100.0 * data,
            )


def _print_quotas(views: list[GroupView]) -> None:
    """A count of the shops with quotas, and the targets nearest their caps."""
    shops = sum(v.quota_shops for v in views)
    if not shops:
        return
    targets = [u for v in views for u in v.quotas]
    busiest = sorted(targets, key=lambda u: u.load, reverse=True)[:_BUSIEST]
    named = "; ".join(_usage_text(u) for u in busiest if u.load > 0)
    print(f"quotas: {shops:,} shop(s), {len(targets):,} target(s)" + (f"; busiest: {named}" if named else ""))


def _usage_text(usage: TargetUsage) -> str:
    who = usage.shop if not usage.app else f"{usage.shop}/{usage.app}"
    parts = []
    if usage.quota.max_concurrent is not None:
        parts.append(f"{usage.in_flight}/{usage.quota.max_concurrent} in flight")
    if usage.quota.max_instructions_per_s is not None and usage.tokens is not None:
        parts.append(f"{usage.tokens:,}/{usage.quota.max_instructions_per_s:,} instructions left")
    return f"{who} {', '.join(parts)}"


def _data(sizes: DataSizes | None) -> dict[str, Any] | None:
    """One group's data sizes for ``--json`` (None: its Redis did not answer)."""
    if sizes is None:
        return None
    return {
        "shops": sizes.shops,
        "shop_bytes": sizes.shop_bytes,
        "apps": sizes.apps,
        "app_keys": sizes.app_keys,
        "complete": sizes.complete,
    }


def _beat(beat: WorkerHeartbeat) -> dict[str, Any]:
    return {
        "name": beat.name,
        "host": beat.host,
        "pid": beat.pid,
        "shards": list(beat.shards),
        "shard_count": beat.shard_count,
        "executed": beat.executed,
        "dropped_stale": beat.dropped_stale,
        "cache": beat.cache,
        "store": beat.store,
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
