"""``scriptpool shard move`` and ``shard drain``: moving one shard to another shard group's Redis
while its shops are being called, with no caller seeing a missing script.

The procedure (README, "Moving a shard"):

1. ``shard move S --to URL`` copies what shard S's shops need into URL's Redis: exactly the keys
   ``Keys.shop_key_patterns`` matches for each shop of S (bindings, their apps' history, and
   rollouts with their candidates' state), the modules and artifacts those name, and any
   extension point or provider the target lacks; it prints the new ``SCRIPTPOOL_SHARD_GROUPS``.
   Nothing is deleted, so both groups can serve S meanwhile.
2. Start workers for S with the new map: they serve S's queue in the new group.
3. Give every client and deployer the new map (a rolling restart). A client still on the old map
   keeps publishing to the old group, whose workers still serve it, from bindings that are there.
4. ``shard drain S --from OLD_URL`` (with the new map) waits until nothing arrives in S's old
   queue and its old workers have taken their last job, copies any deploy that reached the old
   group after step 1, and then says the old workers of S may stop.

Copies use DUMP and RESTORE, so values, list order and expiry travel byte for byte. A binding the
target already holds in a newer version (deployed there after the switch) is kept, not
overwritten; running ``shard move`` again is safe.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from scriptpool.cli._output import ExitCode, add_json_flag, print_json
from scriptpool.config import (
    Keys,
    Settings,
    ShardGroup,
    WriteSession,
    check_redis_url,
    describe_redis_url,
    live_workers,
    ranges_text,
    redis_client,
    render_shard_groups,
    shard_for,
)
from scriptpool.config.errors import BrokerUnavailable, InvalidArgument, NotReplicated, ShardNotDrained

_BATCH = 200  # keys per pipelined round trip
_TRANSPORT = (redis.ConnectionError, redis.TimeoutError, OSError)


def add_parsers(sub: Any) -> None:
    shard = sub.add_parser("shard", help="move a shard to another shard group's Redis (see README)")
    actions = shard.add_subparsers(dest="shard_command", required=True, metavar="ACTION")
    move = actions.add_parser(
        "move",
        help="copy a shard's bindings, history, modules and artifacts to another Redis, print the new map",
    )
    move.add_argument("shard", type=int, help="shard number")
    move.add_argument("--to", required=True, metavar="URL", help="the Redis the shard moves to")
    add_json_flag(move)
    move.set_defaults(func=cmd_move)
    drain = actions.add_parser(
        "drain",
        help="with the new map: wait until the shard's old queue is idle, copy late deploys, "
        "say when its old workers may stop",
    )
    drain.add_argument("shard", type=int, help="shard number")
    drain.add_argument("--from", dest="source", required=True, metavar="URL", help="the Redis it moved from")
    drain.add_argument(
        "--quiet-s",
        type=float,
        default=5.0,
        metavar="S",
        help="how long the old queue must stay idle (default 5; worker heartbeats come every 2 s)",
    )
    drain.add_argument(
        "--timeout-s", type=float, default=120.0, metavar="S", help="give up after (default 120)"
    )
    drain.add_argument(
        "--delete",
        action="store_true",
        help="then delete the shard's bindings and history from the old Redis",
    )
    add_json_flag(drain)
    drain.set_defaults(func=cmd_drain)


@dataclass
class CopyReport:
    """What one copy moved (counts of keys)."""

    shard: int
    source: str
    target: str
    shops: int = 0
    bindings: int = 0
    histories: int = 0
    unchanged: int = 0  # bindings the target already had, identical
    kept_newer: list[str] = field(default_factory=list)  # bindings newer on the target: kept
    modules: int = 0
    artifacts: int = 0
    extension_points: int = 0
    providers: int = 0
    changed_meanwhile: list[str] = field(default_factory=list)  # deployed on the source during the copy
    replicas: int = 0


def _shard_of_shop(shop: str, shards: int) -> int | None:
    try:
        return shard_for(shop, shards)
    except InvalidArgument:
        return None  # a key of ours with a shop id we would never have written


def shard_keys(client: redis.Redis, keys: Keys, shard: int, shards: int) -> list[str]:
    """Every key of shard ``shard``'s shops (``Keys.shop_key_patterns``), by SCAN, sorted."""
    found: set[str] = set()
    for pattern in keys.shop_key_patterns():
        for raw in client.scan_iter(match=pattern, count=1000):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            shop = keys.shop_of_key(key)
            if shop is not None and _shard_of_shop(shop, shards) == shard:
                found.add(key)
    return sorted(found)


Binding = dict[str, bytes]  # a binding hash's fields: an app's deployment, "#generation", "#candidate"


def _recency(binding: Binding) -> tuple[int, float]:
    """How recent a binding is: its generation (every change counts one), then when its newest
    app was deployed (two groups may both have changed it if it was deployed on both sides of a
    switch)."""
    deployed = [
        json.loads(raw).get("deployed_at", 0.0) for name, raw in binding.items() if not name.startswith("#")
    ]
    return int(binding.get("#generation", b"0")), max(deployed, default=0.0)


def _modules_named(deployments: Iterable[bytes | str]) -> set[str]:
    """The module hashes a set of deployment records name: their own and their providers'."""
    found: set[str] = set()
    for raw in deployments:
        deployment = json.loads(raw)
        found.add(deployment["sha256"])
        found.update(sha for _, sha in deployment.get("providers") or ())
    return found


def _deployments_in(binding: Binding) -> list[bytes | str]:
    """Every deployment a binding names: each app's, and a rollout candidate's."""
    found: list[bytes | str] = [raw for name, raw in binding.items() if not name.startswith("#")]
    if "#candidate" in binding:
        found.append(json.dumps(json.loads(binding["#candidate"])["deployment"]))
    return found


def _copy(source: redis.Redis, target: redis.Redis, names: list[str], *, replace: bool) -> int:
    """DUMP ``names`` on the source and RESTORE them on the target, in batches; returns how many
    were written (a missing source key, or an existing target key without ``replace``, is not)."""
    written = 0
    for start in range(0, len(names), _BATCH):
        batch = names[start : start + _BATCH]
        with source.pipeline(transaction=False) as pipe:
            for name in batch:
                pipe.dump(name)
                pipe.pttl(name)
            answers = pipe.execute()
        with target.pipeline(transaction=False) as pipe:
            queued = 0
            for name, dump, ttl in zip(batch, answers[0::2], answers[1::2], strict=True):
                if dump is None:
                    continue
                pipe.restore(name, max(int(ttl), 0), dump, replace=replace)
                queued += 1
            results = pipe.execute(raise_on_error=False) if queued else []
        for result in results:
            if isinstance(result, redis.ResponseError):
                if "BUSYKEY" not in str(result):
                    raise result
            else:
                written += 1
    return written


def copy_shard(settings: Settings, shard: int, source_url: str, target_url: str) -> CopyReport:
    """Copy what shard ``shard``'s shops need from one Redis to another (step 1 and the late copy
    of step 4 of the procedure), then wait for the target's replicas. A Redis lost on the way is
    one ``BrokerUnavailable`` naming both ends: the copy is safe to run again."""
    try:
        return _copy_shard(settings, shard, source_url, target_url)
    except _TRANSPORT as exc:
        raise BrokerUnavailable(
            f"lost Redis while copying shard {shard} from {describe_redis_url(source_url)} to "
            f"{describe_redis_url(target_url)} ({exc}); run it again: it copies what is missing"
        ) from None


def _copy_shard(settings: Settings, shard: int, source_url: str, target_url: str) -> CopyReport:
    keys = settings.keys
    report = CopyReport(shard, describe_redis_url(source_url), describe_redis_url(target_url))
    source = redis_client(source_url, timeout=10, connect_timeout=2)
    wait_ms = settings.deploy_wait_ms
    # One connection for every write to the target, so the WAIT at the end covers them all.
    session = WriteSession(target_url, timeout=max(10, wait_ms / 1000 + 1), connect_timeout=2)
    target = session.client
    try:
        names = shard_keys(source, keys, shard, settings.shards)
        report.shops = len({keys.shop_of_key(name) for name in names})
        bindings = [name for name in names if keys.is_binding(name)]
        companions = [name for name in names if not keys.is_binding(name)]
        # Which bindings to (re)write: the target lacks them, or holds an older version.
        source_raw = dict(zip(bindings, _values(source, bindings), strict=True))
        target_raw = dict(zip(bindings, _values(target, bindings), strict=True))
        write: list[str] = []
        for name in bindings:
            mine, theirs = source_raw[name], target_raw[name]
            if mine is None:
                continue
            if theirs == mine:
                report.unchanged += 1
            elif theirs is not None and _recency(theirs) > _recency(mine):
                report.kept_newer.append(name)
            else:
                write.append(name)
        # History and rollout state go with their binding (they only ever change together).
        chosen = set(write)
        histories_to_write = sorted(n for n in companions if keys.binding_of_key(n) in chosen)
        history_lists = [n for n in histories_to_write if n.startswith(f"{keys.prefix}:history:")]
        history_values: list[Any] = [v for h in history_lists for v in source.lrange(h, 0, -1)]
        needed = _modules_named(
            [raw for name in write if (binding := source_raw[name]) for raw in _deployments_in(binding)]
        )
        needed |= _modules_named(history_values)
        # What every group holds: extension points and providers the target lacks.
        eps = sorted(_text(n) for n in source.smembers(keys.extension_points()))
        providers = sorted(_text(n) for n in source.smembers(keys.providers()))
        provider_raws = source.mget([keys.provider(n) for n in providers]) if providers else []
        needed |= {json.loads(raw)["sha256"] for raw in provider_raws if raw}
        # Bytes before anything names them, as a deploy writes them: modules, artifacts, then
        # definitions, history, and the bindings last.
        modules = sorted(needed)
        report.modules = _copy(source, target, [keys.module(sha) for sha in modules], replace=False)
        artifact_names = sorted(
            _text(raw)
            for sha in modules
            for raw in source.scan_iter(match=keys.artifacts_pattern(sha), count=1000)
        )
        report.artifacts = _copy(source, target, artifact_names, replace=False)
        report.extension_points = _copy(source, target, [keys.extension_point(n) for n in eps], replace=False)
        report.providers = _copy(source, target, [keys.provider(n) for n in providers], replace=False)
        if eps:
            target.sadd(keys.extension_points(), *eps)
        if providers:
            target.sadd(keys.providers(), *providers)
        report.histories = _copy(source, target, histories_to_write, replace=True)
        report.bindings = _copy(source, target, write, replace=True)
        # The set of rollouts under way is every shop's: add the moved ones still under way.
        under_way = [
            f"{ep}/{shop}"
            for name in write
            if (binding := source_raw[name]) and "#candidate" in binding
            for ep, shop in [_ep_and_shop(keys, name)]
        ]
        if under_way:
            target.sadd(keys.rollouts_under_way(), *under_way)
        # A deploy that reached the source while we copied: the next copy (or drain) takes it.
        if write:
            again = dict(zip(write, _values(source, write), strict=True))
            report.changed_meanwhile = [name for name in write if again[name] != source_raw[name]]
        replicas = settings.deploy_replicas_for(target_url)
        if replicas:
            report.replicas = session.confirm(replicas, wait_ms)
            if report.replicas < replicas:
                raise NotReplicated(
                    f"shard {shard}'s keys are on the primary of {describe_redis_url(target_url)}, but only "
                    f"{report.replicas} of {replicas} replica(s) acknowledged them within {wait_ms} ms; "
                    "check its replicas, then run `scriptpool shard move` again before switching the map",
                    acknowledged=report.replicas,
                    required=replicas,
                    timeout_ms=wait_ms,
                )
    finally:
        source.close()
        session.close()
    return report


def moved_map(settings: Settings, shard: int, target_url: str) -> str:
    """``SCRIPTPOOL_SHARD_GROUPS`` with ``shard`` served by ``target_url``."""
    owner = {s: settings.group_of(s).url for s in range(settings.shards)}
    owner[shard] = target_url
    by_url: dict[str, list[int]] = {}
    for s in range(settings.shards):
        by_url.setdefault(owner[s], []).append(s)
    groups = sorted(
        (ShardGroup(ranges_text(found), url, tuple(found)) for url, found in by_url.items()),
        key=lambda g: g.shards[0],
    )
    return render_shard_groups(groups)


def _check_shard(settings: Settings, shard: int) -> None:
    if not 0 <= shard < settings.shards:
        raise InvalidArgument(
            f"shard must be in 0..{settings.shards - 1} (SCRIPTPOOL_SHARDS={settings.shards})"
        )


def cmd_move(args: argparse.Namespace, settings: Settings) -> int:
    _check_shard(settings, args.shard)
    target = check_redis_url(args.to, "--to")
    source = settings.group_of(args.shard).url
    if target == source:
        raise InvalidArgument(f"shard {args.shard} is already served by {describe_redis_url(target)}")
    report = copy_shard(settings, args.shard, source, target)
    new_map = moved_map(settings, args.shard, target)
    if args.json:
        print_json({**asdict(report), "shard_groups": new_map})
        return ExitCode.OK
    print(
        f"copied shard {args.shard} ({report.shops} shops) from {report.source} to {report.target}: "
        f"{report.bindings} bindings, {report.histories} histories, {report.modules} modules, "
        f"{report.artifacts} artifacts, {report.extension_points} extension points, "
        f"{report.providers} providers ({report.unchanged} bindings already there, "
        f"{len(report.kept_newer)} newer there: kept)"
    )
    if report.changed_meanwhile:
        print(
            f"{len(report.changed_meanwhile)} binding(s) changed during the copy: `shard drain` copies them"
        )
    print("next:")
    print(f"  1. start workers for shard {args.shard} with SCRIPTPOOL_SHARD_GROUPS='{new_map}'")
    print("  2. give every client and deployer that value (restart them)")
    print(f"  3. scriptpool shard drain {args.shard} --from '{source}'")
    return ExitCode.OK


@dataclass
class DrainReport:
    shard: int
    source: str
    idle_s: float
    queue_depth: int
    old_workers: list[str]
    late_copy: CopyReport | None
    deleted: int = 0


def drain_shard(
    settings: Settings,
    shard: int,
    source_url: str,
    *,
    quiet_s: float,
    timeout_s: float,
    delete: bool,
    clock: Callable[[], float] = time.monotonic,
) -> DrainReport:
    """Step 4: wait until shard ``shard``'s queue in the old Redis is empty and its old workers
    have taken no job for ``quiet_s``; then copy what was deployed there late; then (``delete``)
    remove the shard's shop keys from the old Redis."""
    keys = settings.keys
    target_url = settings.group_of(shard).url
    if target_url == source_url:
        raise InvalidArgument(
            f"SCRIPTPOOL_SHARD_GROUPS still puts shard {shard} on {describe_redis_url(source_url)}: "
            "drain runs with the new map"
        )
    source = redis_client(source_url, timeout=10, connect_timeout=2)
    try:
        started = clock()
        last_change = started
        seen: tuple[int, int] | None = None
        while True:
            depth = int(source.llen(keys.queue(shard)))
            beats = [b for b in live_workers(source, keys) if shard in b.shards]
            taken = sum(b.shard_jobs.get(shard, 0) for b in beats)
            now = clock()
            if seen != (depth, taken) or depth:
                seen, last_change = (depth, taken), now
            if now - last_change >= quiet_s:
                break
            if now - started > timeout_s:
                raise ShardNotDrained(
                    f"shard {shard}'s old queue in {describe_redis_url(source_url)} was not idle for "
                    f"{quiet_s:g} s within {timeout_s:g} s ({depth} message(s) queued, {len(beats)} old "
                    "worker(s) still taking jobs): some client still uses the old SCRIPTPOOL_SHARD_GROUPS",
                    shard=shard,
                    queue_depth=depth,
                )
            time.sleep(0.2)
        late = copy_shard(settings, shard, source_url, target_url)
        report = DrainReport(
            shard,
            describe_redis_url(source_url),
            round(clock() - last_change, 2),
            depth,
            [b.name for b in beats],
            late,
        )
        if delete:
            names = shard_keys(source, keys, shard, settings.shards)
            for start in range(0, len(names), _BATCH):
                report.deleted += int(source.delete(*names[start : start + _BATCH]))
        return report
    finally:
        source.close()


def cmd_drain(args: argparse.Namespace, settings: Settings) -> int:
    _check_shard(settings, args.shard)
    source = check_redis_url(args.source, "--from")
    if not args.quiet_s > 0 or not args.timeout_s > 0:
        raise InvalidArgument("--quiet-s and --timeout-s must be positive")
    try:
        report = drain_shard(
            settings, args.shard, source, quiet_s=args.quiet_s, timeout_s=args.timeout_s, delete=args.delete
        )
    except _TRANSPORT as exc:
        raise BrokerUnavailable(
            f"lost Redis while draining shard {args.shard} ({describe_redis_url(source)} to "
            f"{describe_redis_url(settings.group_of(args.shard).url)}): {exc}; run it again"
        ) from None
    if args.json:
        print_json(asdict(report))
        return ExitCode.OK
    late = report.late_copy
    print(f"shard {args.shard}'s old queue in {report.source} is empty and idle for {report.idle_s:g} s")
    if late is not None and (late.bindings or late.histories):
        print(
            f"copied {late.bindings} binding(s) and {late.histories} history list(s) deployed there meanwhile"
        )
    if late is not None and late.kept_newer:
        print(f"{len(late.kept_newer)} binding(s) are newer in the new group and were kept")
    if report.old_workers:
        print(f"stop the old workers of shard {args.shard} now: {', '.join(report.old_workers)}")
    if args.delete:
        print(f"deleted {report.deleted} key(s) of shard {args.shard}'s shops from {report.source}")
    return ExitCode.OK


def _values(client: redis.Redis, names: list[str]) -> list[Binding | None]:
    """The binding hashes ``names``, each as its fields (None: no such binding). A binding from
    before apps (one string) reads as app ``default``."""
    found: list[Binding | None] = []
    for start in range(0, len(names), _BATCH):
        batch = names[start : start + _BATCH]
        with client.pipeline(transaction=False) as pipe:
            for name in batch:
                pipe.hgetall(name)
            answers = pipe.execute(raise_on_error=False)
        for name, answer in zip(batch, answers, strict=True):
            if isinstance(answer, redis.ResponseError):  # WRONGTYPE: a binding from before apps
                legacy: Any = client.get(name)
                found.append({"default": legacy} if legacy is not None else None)
            else:
                found.append({_text(k): v for k, v in answer.items()} or None)
    return found


def _ep_and_shop(keys: Keys, binding_key: str) -> tuple[str, str]:
    ep, _, shop = binding_key.removeprefix(f"{keys.prefix}:binding:").partition(":")
    return ep, shop


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
