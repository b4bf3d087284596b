"""Quotas per shop and per app within a shop (README, "Quotas"): the model, where it is stored,
and what is in use now.

A target is a whole shop (app ``""``: :data:`SHOP_WIDE`) or one app of it. Its :class:`Quota`
caps the calls it has in flight at once (``max_concurrent``) and the instructions its scripts
run per second (``max_instructions_per_s``: a token bucket holding one second of the rate,
charged after each run, so it may go into debt that time pays back). The quotas of a shop are
one hash in its shard group's Redis (``Keys.quotas``), indexed by ``Keys.quota_shops``; they move
with the shop when its shard changes group. Workers enforce them with the two scripts of
:class:`QuotaScripts`, atomically across every worker of the group.

What is read back from Redis is hostile: an entry that is not a quota we would write is ignored
(and logged), never raised.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from scriptpool.config._keys import Keys
from scriptpool.config._logging import get_logger
from scriptpool.config._names import check_app, check_integer, check_shop_id
from scriptpool.config._quota_lua import MAX_DEBT_S, QuotaScripts
from scriptpool.config.errors import InvalidArgument

__all__ = [
    "CONCURRENCY",
    "INSTRUCTIONS_PER_SECOND",
    "MAX_CONCURRENT",
    "MAX_DEBT_S",
    "MAX_INSTRUCTIONS_PER_S",
    "SHOP_WIDE",
    "Quota",
    "QuotaScripts",
    "ShopQuotas",
    "TargetUsage",
    "all_quotas",
    "clear_quota",
    "parse_quotas",
    "quotas_of",
    "set_quota",
    "usage_now",
]

MAX_CONCURRENT = 100_000
MAX_INSTRUCTIONS_PER_S = 10**13
SHOP_WIDE = ""  # the target (hash field) of a shop's own quota
CONCURRENCY = "concurrency"
INSTRUCTIONS_PER_SECOND = "instructions_per_second"
# A stored entry longer than this is not one we wrote (ours are under 80 bytes).
_MAX_ENTRY_BYTES = 1024

log = get_logger("quotas")


@dataclass(frozen=True, slots=True)
class Quota:
    """The limits of one target; None leaves that limit unset, and at least one is set.
    ``max_concurrent``: 1 to 100,000 calls in flight at once; ``max_instructions_per_s``: 1 to
    10^13 instructions per second. Anything else is :class:`InvalidArgument` naming the field."""

    max_concurrent: int | None = None
    max_instructions_per_s: int | None = None

    def __post_init__(self) -> None:
        if self.max_concurrent is not None:
            check_integer("Quota", "max_concurrent", self.max_concurrent, 1, MAX_CONCURRENT)
        if self.max_instructions_per_s is not None:
            check_integer(
                "Quota", "max_instructions_per_s", self.max_instructions_per_s, 1, MAX_INSTRUCTIONS_PER_S
            )
        if self.max_concurrent is None and self.max_instructions_per_s is None:
            raise InvalidArgument(
                "a quota sets max_concurrent, max_instructions_per_s or both (to remove one, clear it)"
            )

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(
            {"max_concurrent": self.max_concurrent, "max_instructions_per_s": self.max_instructions_per_s},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Quota:
        """The quota a stored entry holds; :class:`ValueError` or :class:`InvalidArgument` if it
        holds none (not JSON, not an object, a limit of the wrong type or out of range)."""
        if len(raw) > _MAX_ENTRY_BYTES:
            raise ValueError(f"{len(raw)} bytes, more than any quota")
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"not an object but {type(data).__name__}")
        return cls(data.get("max_concurrent"), data.get("max_instructions_per_s"))

    def as_dict(self) -> dict[str, int | None]:
        """For JSON output."""
        return {"max_concurrent": self.max_concurrent, "max_instructions_per_s": self.max_instructions_per_s}


@dataclass(frozen=True, slots=True)
class ShopQuotas:
    """A shop's quotas: its own (``shop_wide``) and its apps' (by app name)."""

    shop: str
    shop_wide: Quota | None = None
    apps: Mapping[str, Quota] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """Whether no target of the shop has a quota."""
        return self.shop_wide is None and not self.apps

    def targets(self, apps: Iterable[str]) -> list[tuple[str, Quota]]:
        """The targets a call running ``apps`` counts against that have a quota: the shop
        (app ``""``) first, then each app, once, in the order given."""
        found = [(SHOP_WIDE, self.shop_wide)] if self.shop_wide is not None else []
        for app in dict.fromkeys(apps):
            quota = self.apps.get(app)
            if quota is not None and app != SHOP_WIDE:
                found.append((app, quota))
        return found

    def all_targets(self) -> list[tuple[str, Quota]]:
        """Every target with a quota, the shop first, then its apps by name."""
        return self.targets(sorted(self.apps))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def parse_quotas(shop: str, raw: Mapping[Any, Any]) -> ShopQuotas:
    """A shop's quotas from its stored hash (``HGETALL``); an entry that is not one we would
    write (a bad field name, not JSON, a limit of the wrong type or out of range) is logged and
    left out."""
    shop_wide: Quota | None = None
    apps: dict[str, Quota] = {}
    for name, value in raw.items():
        target = _text(name) if isinstance(name, bytes | str) else repr(name)
        try:
            if target != SHOP_WIDE:
                check_app(target)
            if not isinstance(value, bytes | str):
                raise ValueError(f"a {type(value).__name__}")
            quota = Quota.from_json(value)
        except (ValueError, RecursionError, InvalidArgument) as exc:
            problem = exc.message if isinstance(exc, InvalidArgument) else str(exc)
            log.warning("quota_ignored", shop=shop, target=target[:80], problem=problem[:200])
            continue
        if target == SHOP_WIDE:
            shop_wide = quota
        else:
            apps[target] = quota
    return ShopQuotas(shop, shop_wide, dict(sorted(apps.items())))


def quotas_of(client: redis.Redis, keys: Keys, shop: str) -> ShopQuotas:
    """``shop``'s quotas, as stored (one ``HGETALL``)."""
    return parse_quotas(shop, client.hgetall(keys.quotas(shop)))


def _target(shop: str | int, app: str | None) -> tuple[str, str]:
    return check_shop_id(shop), SHOP_WIDE if app is None else check_app(app)


def set_quota(
    client: redis.Redis, keys: Keys, shop: str | int, quota: Quota, *, app: str | None = None
) -> None:
    """Give ``shop`` (or its ``app``) ``quota``, replacing what it had; workers apply it within
    their cache's lifetime (about a second)."""
    if not isinstance(quota, Quota):
        raise InvalidArgument(f"quota must be a Quota, got {type(quota).__name__}")
    shop_id, target = _target(shop, app)
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(keys.quotas(shop_id), target, quota.to_json())
        pipe.sadd(keys.quota_shops(), shop_id)
        pipe.execute()


# Removes one target's quota, and the shop from the index when it was its last.
_CLEAR = """
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
return removed
"""


def clear_quota(client: redis.Redis, keys: Keys, shop: str | int, *, app: str | None = None) -> bool:
    """Remove the quota of ``shop`` (or of its ``app``); whether it had one."""
    shop_id, target = _target(shop, app)
    removed = client.eval(_CLEAR, 2, keys.quotas(shop_id), keys.quota_shops(), target, shop_id)
    return bool(removed)


def all_quotas(client: redis.Redis, keys: Keys, *, most: int = 10_000) -> list[ShopQuotas]:
    """The quotas of the shops (at most ``most``, by id) that have any on ``client``'s Redis."""
    shops = sorted(_text(s) for s in client.smembers(keys.quota_shops()))[:most]
    found: list[ShopQuotas] = []
    with client.pipeline(transaction=False) as pipe:
        for shop in shops:
            pipe.hgetall(keys.quotas(shop))
        for shop, raw in zip(shops, pipe.execute() if shops else [], strict=True):
            quotas = parse_quotas(shop, raw)
            if not quotas.empty:
                found.append(quotas)
    return found


@dataclass(frozen=True, slots=True)
class TargetUsage:
    """What one target uses now: calls in flight, and the tokens its bucket holds (None
    without an instruction cap; negative: debt)."""

    shop: str
    app: str
    quota: Quota
    in_flight: int
    tokens: int | None

    @property
    def load(self) -> float:
        """How close to its cap the target is (1.0: at it; more: in debt), for ranking."""
        loads = [0.0]
        if self.quota.max_concurrent is not None:
            loads.append(self.in_flight / self.quota.max_concurrent)
        if self.quota.max_instructions_per_s is not None and self.tokens is not None:
            loads.append(1.0 - self.tokens / self.quota.max_instructions_per_s)
        return max(loads)

    def as_dict(self) -> dict[str, Any]:
        """For JSON output."""
        return {
            "shop": self.shop,
            "app": self.app or None,
            **self.quota.as_dict(),
            "in_flight": self.in_flight,
            "tokens": self.tokens,
        }


def _tokens_now(raw: Sequence[Any], rate: int, now: float) -> int:
    """What a bucket holds at ``now`` (the scripts' refill, read only); full if unreadable."""
    try:
        tokens, at = float(raw[0]), float(raw[1])
    except (TypeError, ValueError):
        return rate
    if not (math.isfinite(at) and at <= now + 60) or math.isnan(tokens):
        return rate
    tokens = max(tokens, -rate * MAX_DEBT_S)
    return math.floor(min(rate, tokens + max(0.0, now - at) * rate))


def usage_now(
    client: redis.Redis, keys: Keys, quotas: Sequence[ShopQuotas], *, now: float | None = None
) -> list[TargetUsage]:
    """What every target of ``quotas`` uses at ``now`` (default: this host's clock), in one
    round trip; slots whose deadline has passed are not counted."""
    now = time.time() if now is None else now
    rows = [(q.shop, app, quota) for q in quotas for app, quota in q.all_targets()]
    if not rows:
        return []
    with client.pipeline(transaction=False) as pipe:
        for shop, app, _ in rows:
            pipe.zcount(keys.quota_in_flight(shop, app), f"({now!r}", "+inf")
            pipe.hmget(keys.quota_bucket(shop, app), ["tokens", "at"])
        answers = pipe.execute()
    found = []
    for at, (shop, app, quota) in enumerate(rows):
        in_flight, bucket = answers[2 * at], answers[2 * at + 1]
        rate = quota.max_instructions_per_s
        tokens = None if rate is None else _tokens_now(bucket, rate, now)
        found.append(TargetUsage(shop, app, quota, int(in_flight), tokens))
    return found
