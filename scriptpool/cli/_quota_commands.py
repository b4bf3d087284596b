"""``scriptpool quota set``, ``quota clear`` and ``quota show``: the quotas of a shop and of its
apps, stored in the shop's shard group (README, "Quotas")."""

from __future__ import annotations

import argparse
from typing import Any

import redis

from scriptpool.cli._output import ExitCode, add_json_flag, print_json
from scriptpool.config import Settings, check_app, check_shop_id, shard_for
from scriptpool.config.errors import InvalidArgument
from scriptpool.config.quotas import (
    MAX_CONCURRENT,
    MAX_INSTRUCTIONS_PER_S,
    Quota,
    TargetUsage,
    all_quotas,
    clear_quota,
    quotas_of,
    set_quota,
    usage_now,
)
from scriptpool.config.redis import redis_client

_FLAGS = {"max_concurrent": "--max-concurrent", "max_instructions_per_s": "--max-instructions-per-second"}
_RANGES = {"max_concurrent": (1, MAX_CONCURRENT), "max_instructions_per_s": (1, MAX_INSTRUCTIONS_PER_S)}


def add_parsers(sub: Any) -> None:
    """The parser of ``quota`` and its actions."""
    quota = sub.add_parser(
        "quota", help="caps per shop and per app: calls in flight, instructions per second"
    )
    actions = quota.add_subparsers(dest="quota_command", required=True, metavar="ACTION")
    put = actions.add_parser("set", help="set or change a shop's (or one of its apps') limits")
    _target_flags(put)
    put.add_argument(
        "--max-concurrent",
        metavar="N",
        help=f"calls in flight at once, 1 to {MAX_CONCURRENT:,} (none: remove this limit)",
    )
    put.add_argument(
        "--max-instructions-per-second",
        metavar="N",
        help="instructions per second, 1 to 10^13 (none: remove this limit)",
    )
    add_json_flag(put)
    put.set_defaults(func=cmd_quota_set)
    clear = actions.add_parser("clear", help="remove a shop's (or one of its apps') quota")
    _target_flags(clear)
    add_json_flag(clear)
    clear.set_defaults(func=cmd_quota_clear)
    show = actions.add_parser("show", help="the quotas set, and what each target uses now")
    show.add_argument("--shop", help="one shop's quotas (default: every shop's, in every group)")
    add_json_flag(show)
    show.set_defaults(func=cmd_quota_show)


def _target_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shop", required=True, help="the shop")
    parser.add_argument("--app", help="one app within the shop (default: the whole shop)")


def _limit(flag: str, text: str | None, old: int | None) -> int | None:
    """The limit after the command: ``old`` if the flag is absent, None for ``none``."""
    if text is None:
        return old
    if text.strip().lower() == "none":
        return None
    try:
        return int(text, 10)
    except ValueError:
        raise InvalidArgument(f"{flag} must be a whole number or none, got {text[:40]!r}") from None


def _quota(max_concurrent: int | None, max_instructions_per_s: int | None) -> Quota:
    """The quota, its range errors naming the flag rather than the field."""
    try:
        return Quota(max_concurrent, max_instructions_per_s)
    except InvalidArgument as exc:
        field = exc.detail.get("field")
        if field not in _FLAGS:
            raise
        low, high = _RANGES[field]
        raise InvalidArgument(
            f"{_FLAGS[field]} must be a whole number from {low:,} to {high:,} (or none)", field=field
        ) from None


def _client(settings: Settings, shop: str) -> redis.Redis:
    """A client on the Redis of ``shop``'s shard group."""
    return redis_client(settings.group_of(shard_for(shop, settings.shards)).url, timeout=5, connect_timeout=2)


def _who(shop: str, app: str | None) -> str:
    return f"shop {shop}" if app is None else f"app {app} at shop {shop}"


def cmd_quota_set(args: argparse.Namespace, settings: Settings) -> int:
    shop, app = check_shop_id(args.shop), None if args.app is None else check_app(args.app)
    if args.max_concurrent is None and args.max_instructions_per_second is None:
        raise InvalidArgument("quota set: give --max-concurrent, --max-instructions-per-second or both")
    _limit("--max-concurrent", args.max_concurrent, None)  # a typo is refused before Redis is asked
    _limit("--max-instructions-per-second", args.max_instructions_per_second, None)
    client = _client(settings, shop)
    try:
        stored = quotas_of(client, settings.keys, shop)
        old = stored.shop_wide if app is None else stored.apps.get(app)
        concurrent = _limit(
            "--max-concurrent", args.max_concurrent, None if old is None else old.max_concurrent
        )
        rate = _limit(
            "--max-instructions-per-second",
            args.max_instructions_per_second,
            None if old is None else old.max_instructions_per_s,
        )
        quota = None if concurrent is None and rate is None else _quota(concurrent, rate)
        if quota is not None:
            set_quota(client, settings.keys, shop, quota, app=app)
        else:
            clear_quota(client, settings.keys, shop, app=app)
    finally:
        client.close()
    if args.json:
        print_json({"shop": shop, "app": app, "quota": None if quota is None else quota.as_dict()})
    elif quota is None:
        print(f"{_who(shop, app)}: no limit left, quota removed")
    else:
        print(f"{_who(shop, app)}: {_limits_text(quota)} (workers apply it within about a second)")
    return ExitCode.OK


def cmd_quota_clear(args: argparse.Namespace, settings: Settings) -> int:
    shop, app = check_shop_id(args.shop), None if args.app is None else check_app(args.app)
    client = _client(settings, shop)
    try:
        removed = clear_quota(client, settings.keys, shop, app=app)
    finally:
        client.close()
    if args.json:
        print_json({"shop": shop, "app": app, "removed": removed})
    elif removed:
        print(f"{_who(shop, app)}: quota removed")
    else:
        print(f"{_who(shop, app)} had no quota: nothing to remove")
    return ExitCode.OK


def cmd_quota_show(args: argparse.Namespace, settings: Settings) -> int:
    rows: list[TargetUsage] = []
    if args.shop is not None:
        shop = check_shop_id(args.shop)
        client = _client(settings, shop)
        try:
            quotas = quotas_of(client, settings.keys, shop)
            rows = usage_now(client, settings.keys, [] if quotas.empty else [quotas])
        finally:
            client.close()
    else:
        for group in settings.groups:
            client = redis_client(group.url, timeout=5, connect_timeout=2)
            try:
                rows += usage_now(client, settings.keys, all_quotas(client, settings.keys))
            finally:
                client.close()
    if args.json:
        print_json({"quotas": [row.as_dict() for row in rows]})
        return ExitCode.OK
    if not rows:
        print(f"no quotas{'' if args.shop is None else f' at shop {args.shop}'}")
        return ExitCode.OK
    for row in rows:
        print(f"{_who(row.shop, row.app or None)}: {_limits_text(row.quota, row)}")
    return ExitCode.OK


def _limits_text(quota: Quota, usage: TargetUsage | None = None) -> str:
    parts = []
    if quota.max_concurrent is not None:
        now = f" ({usage.in_flight:,} in flight)" if usage is not None else ""
        parts.append(f"at most {quota.max_concurrent:,} call(s) in flight{now}")
    if quota.max_instructions_per_s is not None:
        left = f" ({usage.tokens:,} left now)" if usage is not None and usage.tokens is not None else ""
        parts.append(f"at most {quota.max_instructions_per_s:,} instructions per second{left}")
    return "; ".join(parts)
