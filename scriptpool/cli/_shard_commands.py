"""``scriptpool shard move`` and ``shard drain``: moving one shard to another shard group's Redis
while its shops are being called, with no caller seeing a missing script.

The procedure (README, "Moving a shard"):

1. ``shard move S --to URL`` copies what shard S's shops need into URL's Redis: exactly the keys
   ``Keys.shop_key_patterns`` matches for each shop of S (bindings, their apps' history,
   rollouts with their candidates' state, and SHOP and SESSION data), the modules and artifacts
   those name, and any extension point, provider or APP data the target lacks; it prints the new
   ``SCRIPTPOOL_SHARD_GROUPS``.
   Nothing is deleted, so both groups can serve S meanwhile.
2. Start workers for S with the new map: they serve S's queue in the new group.
3. Give every client and deployer the new map (a rolling restart). A client still on the old map
   keeps publishing to the old group, whose workers still serve it, from bindings that are there.
4. ``shard drain S --from OLD_URL`` (with the new map) waits until nothing arrives in S's old
   queue and its old workers have taken their last job, copies any deploy that reached the old
   group after step 1, and then says the old workers of S may stop.

Copies use DUMP and RESTORE, so values, list order and expiry travel byte for byte. A binding the
target already holds in a newer version (deployed there after the switch) is kept, not
overwritten; running ``shard move`` again is safe. The copy itself is ``_shard_copy``'s.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from scriptpool.cli._output import ExitCode, add_json_flag, print_json
from scriptpool.cli._shard_copy import BATCH, TRANSPORT, CopyReport, copy_shard, shard_keys
from scriptpool.config import Settings, ShardGroup
from scriptpool.config.errors import BrokerUnavailable, InvalidArgument, ShardNotDrained
from scriptpool.config.groups import ranges_text, render_shard_groups
from scriptpool.config.heartbeats import live_workers
from scriptpool.config.redis import check_redis_url, describe_redis_url, redis_client


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
        f"{report.providers} providers, {report.data} data keys, {report.app_data} APP data, "
        f"{report.quotas} shops' quotas "
        f"({report.unchanged} bindings already there, "
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
    """What a drain saw and did: how long the old queue stood idle, its depth, the old workers
    still beating, the late copy, and how many keys it deleted."""

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
        late = copy_shard(settings, shard, source_url, target_url, late=True)
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
            for start in range(0, len(names), BATCH):
                report.deleted += int(source.delete(*names[start : start + BATCH]))
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
    except TRANSPORT as exc:
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
