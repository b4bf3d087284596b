"""Usage accounting as stored: per (shop, app, EP), calls, outcomes by status and by error code,
instructions, worker-side execution time and bytes in and out, rolled up per minute.

Workers count (``scriptpool.workers``) and add their counts to one hash per shop and minute,
``Keys.usage(shop, minute)``, whose fields are ``app|EP|metric`` (:func:`usage_field`; ``|``
occurs in no app or EP name), and to ``Keys.usage_shops(minute)``, the shops with usage that
minute; both expire a retention after their minute. :func:`read_usage` sums the minutes of a
period. Whoever can write to Redis can write these keys, so a reader skips whatever it cannot
parse instead of failing.

Public as ``scriptpool.config.usage``: the worker writes it, the command line (and a host
billing by it) reads it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from scriptpool.config._keys import Keys
from scriptpool.config._names import is_name, is_shop_id
from scriptpool.config.errors import InvalidArgument

__all__ = [
    "BYTES_IN",
    "BYTES_OUT",
    "CALLS",
    "EXEC_US",
    "INSTRUCTIONS",
    "STATUS_DROPPED",
    "STATUS_REFUSED",
    "UNKNOWN_APP",
    "UsageRow",
    "countable",
    "error_metric",
    "merge_rows",
    "parse_since",
    "parse_usage_field",
    "read_usage",
    "status_metric",
    "usage_field",
]

SEPARATOR = "|"
# The metrics a field counts: these, and one per status (``status:ok``) and error code.
CALLS, INSTRUCTIONS, EXEC_US = "calls", "instructions", "exec_us"
BYTES_IN, BYTES_OUT = "bytes_in", "bytes_out"
_TOTALS = (CALLS, INSTRUCTIONS, EXEC_US, BYTES_IN, BYTES_OUT)
_STATUS, _ERROR = "status:", "error:"
# Beyond ok, error and a join's skipped parts: jobs a worker refused without running them, and
# jobs it dropped because their caller had given up.
STATUS_REFUSED, STATUS_DROPPED = "refused", "dropped"
# The app of a job that never reached a script (refused or dropped): not a valid app name, so
# it is never mistaken for one.
UNKNOWN_APP = "*"

# A status or error code is a short word; a count fits a signed 64-bit Redis integer.
_WORD = re.compile(r"[a-z][a-z0-9_]{0,63}")
_COUNT = re.compile(rb"[0-9]{1,18}")
_SINCE = re.compile(r"([0-9]{1,9})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Hashes read per round trip.
_BATCH = 500


def usage_field(app: str, ep: str, metric: str) -> str:
    """The hash field that counts ``metric`` of ``app`` at ``ep``."""
    return f"{app}{SEPARATOR}{ep}{SEPARATOR}{metric}"


def countable(shop: str, ep: str) -> bool:
    """Whether usage can be counted under ``shop`` and ``ep``: a job's are checked only when it
    runs, and a job with names that are none would otherwise make keys and fields of them."""
    return is_shop_id(shop) and is_name(ep)


def status_metric(status: str) -> str:
    """The metric that counts calls that ended with ``status``."""
    return _STATUS + status


def error_metric(code: str) -> str:
    """The metric that counts calls that failed with error ``code``."""
    return _ERROR + code


def parse_usage_field(raw: bytes | str) -> tuple[str, str, str] | None:
    """(app, EP, metric) of a hash field, or None if it is not one :func:`usage_field` makes."""
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return None
    parts = text.split(SEPARATOR)
    if len(parts) != 3:
        return None
    app, ep, metric = parts
    if not (is_name(ep) and (app == UNKNOWN_APP or is_name(app))):
        return None
    if metric in _TOTALS:
        return app, ep, metric
    kind, _, word = metric.partition(":")
    if kind + ":" in (_STATUS, _ERROR) and _WORD.fullmatch(word):
        return app, ep, metric
    return None


def parse_since(text: str, max_s: int | None = None) -> int:
    """The seconds ``--since`` text means (``90s``, ``30m``, ``1h``, ``2d``), at most ``max_s``
    (the retention: nothing older is kept); :class:`InvalidArgument` for any other text."""
    found = _SINCE.fullmatch(text.strip()) if isinstance(text, str) else None
    if found is None or int(found.group(1)) == 0:
        raise InvalidArgument(
            f"--since {text!r} is not a period: a positive whole number and a unit, s, m, h or d "
            "(90s, 30m, 1h, 2d)",
            argument="since",
        )
    seconds = int(found.group(1)) * _UNITS[found.group(2)]
    return seconds if max_s is None else min(seconds, max_s)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One (shop, app, EP)'s usage summed over a period. ``exec_us`` is the worker-side time of
    its runs (lookup, instantiate, run, decode) in microseconds; ``bytes_in`` and ``bytes_out``
    what its scripts read and wrote; ``by_status`` and ``by_error`` count its calls by status
    (ok, error, skipped, refused, dropped) and by error code."""

    shop: str
    app: str
    ep: str
    calls: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    by_error: dict[str, int] = field(default_factory=dict)
    instructions: int = 0
    exec_us: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def to_json(self) -> dict[str, Any]:
        """The row as ``usage --json`` prints it."""
        return {
            "shop": self.shop,
            "app": self.app,
            "ep": self.ep,
            "calls": self.calls,
            "by_status": dict(self.by_status),
            "by_error": dict(self.by_error),
            "instructions": self.instructions,
            "exec_us": self.exec_us,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


class _Sums:
    """Counts of one (shop, app, EP) as they are added up."""

    __slots__ = ("by_error", "by_status", "totals")

    def __init__(self) -> None:
        self.totals = dict.fromkeys(_TOTALS, 0)
        self.by_status: dict[str, int] = {}
        self.by_error: dict[str, int] = {}

    def add(self, metric: str, count: int) -> None:
        if metric in self.totals:
            self.totals[metric] += count
        elif metric.startswith(_STATUS):
            word = metric[len(_STATUS) :]
            self.by_status[word] = self.by_status.get(word, 0) + count
        else:
            word = metric[len(_ERROR) :]
            self.by_error[word] = self.by_error.get(word, 0) + count

    def row(self, shop: str, app: str, ep: str) -> UsageRow:
        t = self.totals
        return UsageRow(
            shop, app, ep, t[CALLS], dict(sorted(self.by_status.items())),
            dict(sorted(self.by_error.items())), t[INSTRUCTIONS], t[EXEC_US], t[BYTES_IN], t[BYTES_OUT],
        )  # fmt: skip


def read_usage(
    client: Any,
    keys: Keys,
    *,
    shop: str | None = None,
    app: str | None = None,
    ep: str | None = None,
    since_s: int,
    now: float | None = None,
) -> list[UsageRow]:
    """Usage in ``client``'s Redis over the minutes from ``since_s`` ago to ``now`` (both
    minutes included), one row per (shop, app, EP), sorted; only ``shop``'s, ``app``'s and
    ``ep``'s when given. One shard group's: :func:`merge_rows` adds up several groups'."""
    now = time.time() if now is None else now
    last = int(now) // 60
    minutes = range(int(now - max(0, since_s)) // 60, last + 1)
    if shop is not None:
        pairs = [(shop, minute) for minute in minutes]
    else:
        pairs = list(_shops_by_minute(client, keys, minutes))
    sums: dict[tuple[str, str, str], _Sums] = {}
    for at in range(0, len(pairs), _BATCH):
        batch = pairs[at : at + _BATCH]
        pipe = client.pipeline(transaction=False)
        for pair_shop, minute in batch:
            pipe.hgetall(keys.usage(pair_shop, minute))
        # A key of the wrong type (anyone can write Redis) is its error in the list, skipped.
        for (pair_shop, _), fields in zip(batch, pipe.execute(raise_on_error=False), strict=True):
            for raw_field, raw_count in (fields or {}).items() if isinstance(fields, dict) else ():
                parsed = parse_usage_field(raw_field)
                count = _count(raw_count)
                if parsed is None or count is None:
                    continue
                field_app, field_ep, metric = parsed
                if (app is not None and field_app != app) or (ep is not None and field_ep != ep):
                    continue
                key = (pair_shop, field_app, field_ep)
                found = sums.get(key)
                if found is None:
                    found = sums[key] = _Sums()
                found.add(metric, count)
    return [sums[key].row(*key) for key in sorted(sums)]


def merge_rows(groups: Iterable[Iterable[UsageRow]]) -> list[UsageRow]:
    """Rows of several shard groups' :func:`read_usage` added up per (shop, app, EP), sorted
    (a shop moved to another group has counts in both)."""
    sums: dict[tuple[str, str, str], _Sums] = {}
    for rows in groups:
        for row in rows:
            found = sums.setdefault((row.shop, row.app, row.ep), _Sums())
            for name, count in zip(_TOTALS, _totals_of(row), strict=True):
                found.add(name, count)
            for word, count in row.by_status.items():
                found.add(status_metric(word), count)
            for word, count in row.by_error.items():
                found.add(error_metric(word), count)
    return [sums[key].row(*key) for key in sorted(sums)]


def _totals_of(row: UsageRow) -> tuple[int, ...]:
    return row.calls, row.instructions, row.exec_us, row.bytes_in, row.bytes_out


def _shops_by_minute(client: Any, keys: Keys, minutes: range) -> Iterator[tuple[str, int]]:
    """(shop, minute) for each valid shop id in each minute's set of shops."""
    for at in range(0, len(minutes), _BATCH):
        batch = minutes[at : at + _BATCH]
        pipe = client.pipeline(transaction=False)
        for minute in batch:
            pipe.smembers(keys.usage_shops(minute))
        for minute, members in zip(batch, pipe.execute(raise_on_error=False), strict=True):
            for member in members if isinstance(members, set) else ():
                shop = _shop(member)
                if shop is not None:
                    yield shop, minute


def _shop(raw: bytes | str) -> str | None:
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return None
    return text if is_shop_id(text) else None


def _count(raw: Any) -> int | None:
    """A stored count: a non-negative integer of at most 18 digits, else None."""
    data = raw.encode() if isinstance(raw, str) else raw
    if not isinstance(data, bytes) or not _COUNT.fullmatch(data):
        return None
    return int(data)
