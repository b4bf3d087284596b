"""``scriptpool usage``: per (shop, app, EP) calls, outcomes, instructions, execution time and
bytes over a recent period, summed from every shard group's per-minute counts (README, "Usage
accounting")."""

from __future__ import annotations

import argparse
import time
from typing import Any

from scriptpool.cli._output import ExitCode, add_json_flag, print_json
from scriptpool.cli._table import LiveTable
from scriptpool.config import Settings
from scriptpool.config.usage import UsageRow

_COLUMNS = (
    ("SHOP", 20), ("APP", 16), ("EP", 20), ("CALLS", 9), ("OK", 9), ("NOT OK", 9),
    ("INSTRUCTIONS", 15), ("EXEC MS", 11), ("BYTES IN", 12), ("BYTES OUT", 12),
)  # fmt: skip


def add_parsers(sub: Any) -> None:
    """The parser of ``usage``."""
    usage = sub.add_parser(
        "usage",
        help="per shop, app and EP: calls, outcomes, instructions, execution time and bytes",
    )
    usage.add_argument("--shop", help="only this shop")
    usage.add_argument("--app", help="only this app (* for jobs refused or dropped before any app ran)")
    usage.add_argument("--ep", help="only this extension point")
    usage.add_argument(
        "--since",
        default="1h",
        metavar="PERIOD",
        help="from this long ago until now, whole minutes: 90s, 30m, 1h, 2d (default 1h; at most "
        "SCRIPTPOOL_USAGE_RETENTION_S)",
    )
    add_json_flag(usage)
    usage.set_defaults(func=cmd_usage)


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.config import check_app, check_ep, check_shop_id
    from scriptpool.config.redis import redis_client
    from scriptpool.config.usage import UNKNOWN_APP, merge_rows, parse_since, read_usage

    since_s = parse_since(args.since, settings.usage_retention_s)
    shop = None if args.shop is None else check_shop_id(args.shop)
    app = None if args.app is None else args.app if args.app == UNKNOWN_APP else check_app(args.app)
    ep = None if args.ep is None else check_ep(args.ep)
    now = time.time()
    rows = merge_rows(
        read_usage(
            redis_client(group.url, timeout=10, connect_timeout=2),
            settings.keys,
            shop=shop,
            app=app,
            ep=ep,
            since_s=since_s,
            now=now,
        )
        for group in settings.groups
    )
    total = _total(rows)
    if args.json:
        print_json(
            {
                "since_s": since_s,
                "from": (int(now - since_s) // 60) * 60,
                "until": int(now),
                "rows": [row.to_json() for row in rows],
                "total": {k: v for k, v in total.to_json().items() if k not in ("shop", "app", "ep")},
            }
        )
        return ExitCode.OK
    if not rows:
        print(f"no usage in the last {args.since.strip()}" + _filters(shop, app, ep))
        return ExitCode.OK
    table = LiveTable(_COLUMNS)
    for row in rows:
        table.row(*_cells(row))
    codes = ", ".join(f"{code} {count:,}" for code, count in total.by_error.items())
    print(
        f"total: {total.calls:,} calls ({total.by_status.get('ok', 0):,} ok), "
        f"{total.instructions:,} instructions, {total.exec_us / 1000:,.1f} ms, "
        f"{total.bytes_in:,} bytes in, {total.bytes_out:,} bytes out"
        + (f"; errors: {codes}" if codes else "")
    )
    return ExitCode.OK


def _cells(row: UsageRow) -> tuple[object, ...]:
    ok = row.by_status.get("ok", 0)
    return (
        row.shop, row.app, row.ep, f"{row.calls:,}", f"{ok:,}", f"{row.calls - ok:,}",
        f"{row.instructions:,}", f"{row.exec_us / 1000:,.1f}", f"{row.bytes_in:,}", f"{row.bytes_out:,}",
    )  # fmt: skip


def _total(rows: list[UsageRow]) -> UsageRow:
    """Every row added up (shop, app and EP left empty)."""
    from scriptpool.config.usage import merge_rows

    flat = [UsageRow("", "", "", r.calls, r.by_status, r.by_error, r.instructions, r.exec_us,
                     r.bytes_in, r.bytes_out) for r in rows]  # fmt: skip
    merged = merge_rows([flat])
    return merged[0] if merged else UsageRow("", "", "")


def _filters(shop: str | None, app: str | None, ep: str | None) -> str:
    named = [f"{what} {value}" for what, value in (("shop", shop), ("app", app), ("EP", ep)) if value]
    return f" for {', '.join(named)}" if named else ""
