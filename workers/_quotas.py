"""The quota gate a worker's job loop asks before it runs a job, and tells after (README,
"Quotas").

``admit`` checks every target the job counts against (its shop, and each of its apps) that has a
quota, and takes a concurrency slot of each, in one Lua script: the workers of a shard group
share the counts, so the caps hold across them. ``finish`` frees the slots and charges the
instructions the run used. A shop's quotas are cached for ``ttl_s`` (so a change reaches every
worker within about a second); a shop without quotas costs one dict lookup and no Redis call
while its entry is fresh.

Redis failing never fails a job: the gate lets it run (fail open), logs the outage once, and
logs again when Redis answers.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import redis

from scriptpool.config import Keys, get_logger
from scriptpool.config.errors import QuotaExceeded
from scriptpool.config.quotas import CONCURRENCY, SHOP_WIDE, Quota, QuotaScripts, ShopQuotas, quotas_of

log = get_logger("worker")

_FAILURES = (redis.RedisError, OSError)
# A slot is held at most this long past admission, whatever deadline a job carries: past any
# deadline a caller may set (10 minutes) and any script's wall-clock limit.
MAX_HOLD_S = 15 * 60


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why :meth:`QuotaGate.admit` refused a job: the target (``shop``, and ``app``, None for
    the shop-wide quota) and which of its limits (``concurrency`` or
    ``instructions_per_second``) with its value; ``message`` says it in words."""

    shop: str
    app: str | None
    limit: str
    maximum: int
    message: str

    def error(self) -> QuotaExceeded:
        """The error the caller gets (its fallback, at once)."""
        return QuotaExceeded(
            self.message, shop=self.shop, app=self.app, limit=self.limit, maximum=self.maximum
        )


class QuotaGate:
    """Admits or refuses a worker's jobs by their shop's quotas (one per worker process; its
    methods are safe to call from several threads). ``clock`` gives Unix seconds (the same
    clock as a job's deadline); ``max_shops`` bounds the cache."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        clock: Callable[[], float] = time.time,
        ttl_s: float = 1.0,
        *,
        max_shops: int = 10_000,
        max_held: int = 100_000,
    ) -> None:
        self._keys = keys
        self._client = client
        self._scripts = QuotaScripts(client, keys)
        self._clock = clock
        self._ttl_s = ttl_s
        self._max_shops = max_shops
        self._max_held = max_held
        self._cache: dict[str, tuple[float, ShopQuotas | None]] = {}
        # Job id -> (shop, the targets it holds a slot of): what finish frees, even if the
        # quota changed meanwhile.
        self._held: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._lock = threading.Lock()
        self._down = False

    def admit(
        self, job_id: str, shop: str, apps: Sequence[str] | Callable[[], Sequence[str]], deadline: float
    ) -> Refusal | None:
        """None if ``job_id`` may run now (it then holds a slot of each capped target until
        :meth:`finish` or its ``deadline``), else why not. ``apps``: the job's apps, or how to
        find them (called only for a shop that has quotas). Never raises, but for what ``apps``
        raises."""
        now = self._clock()
        quotas = self._quotas(shop, now)
        if quotas is None:
            return None
        targets = quotas.targets(apps() if callable(apps) else apps)
        if not targets:
            return None
        if not math.isfinite(deadline) or deadline > now + MAX_HOLD_S:
            deadline = now + MAX_HOLD_S
        limits = [(app, q.max_concurrent, q.max_instructions_per_s) for app, q in targets]
        try:
            refused = self._scripts.admit(shop, limits, job_id, deadline, now)
        except _FAILURES as exc:
            self._failed(exc)
            return None
        self._answered()
        if refused is None:
            held = tuple(app for app, quota in targets if quota.max_concurrent is not None)
            if held:
                self._hold(job_id, shop, held)
            return None
        index, limit, used = refused
        app, quota = targets[index]
        return _refusal(shop, app, quota, limit, used)

    def finish(self, job_id: str, shop: str, instructions_by_app: Mapping[str, int]) -> None:
        """After ``job_id`` ran (or failed, or was dropped): free its slots, and charge each
        target with an instruction cap what the run used (the shop the sum of its apps'). Never
        raises."""
        _, held = self._held.pop(job_id, (shop, ()))
        now = self._clock()
        quotas = self._quotas(shop, now)
        charges: dict[str, tuple[int | None, int]] = {app: (None, 0) for app in held}
        if quotas is not None:
            for app, quota in quotas.targets(instructions_by_app):
                rate = quota.max_instructions_per_s
                if quota.max_concurrent is not None:
                    # Freed even if admit's answer was lost (a timeout after Redis ran it): a
                    # slot this job does not hold is not in the set, and removing it is a no-op.
                    charges.setdefault(app, (None, 0))
                if rate is not None:
                    used = sum(instructions_by_app.values()) if app == SHOP_WIDE else instructions_by_app[app]
                    charges[app] = (rate, used)
        if not charges:
            return
        try:
            self._scripts.finish(shop, [(app, r, n) for app, (r, n) in charges.items()], job_id, now)
        except _FAILURES as exc:
            self._failed(exc)
            return
        self._answered()

    def forget(self, shop: str | None = None) -> None:
        """Drop the cached quotas of ``shop`` (of every shop: None), so the next job reads them."""
        with self._lock:
            if shop is None:
                self._cache.clear()
            else:
                self._cache.pop(shop, None)

    def _quotas(self, shop: str, now: float) -> ShopQuotas | None:
        """The shop's quotas (None: it has none, or Redis did not answer), from the cache while
        fresh."""
        cached = self._cache.get(shop)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            quotas: ShopQuotas | None = quotas_of(self._client, self._keys, shop)
        except _FAILURES as exc:
            # Cached too: a Redis that does not answer is not asked again by every job.
            self._failed(exc)
            quotas = None
        else:
            self._answered()
        if quotas is not None and quotas.empty:
            quotas = None
        with self._lock:
            self._cache.pop(shop, None)  # re-inserted last: the oldest entries go first
            while len(self._cache) >= self._max_shops:
                del self._cache[next(iter(self._cache))]
            self._cache[shop] = (now + self._ttl_s, quotas)
        return quotas

    def _hold(self, job_id: str, shop: str, held: tuple[str, ...]) -> None:
        with self._lock:
            # A job never finished (its worker's loop lost it) is forgotten eventually; its slot
            # is freed by its deadline anyway.
            while len(self._held) >= self._max_held:
                del self._held[next(iter(self._held))]
            self._held[job_id] = (shop, held)

    def _failed(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            log.warning("quota_gate_failing_open", error=str(exc)[:200])

    def _answered(self) -> None:
        if self._down:
            self._down = False
            log.info("quota_gate_back")


def _refusal(shop: str, app: str, quota: Quota, limit: str, used: int) -> Refusal:
    who = f"shop {shop}" if app == SHOP_WIDE else f"app {app} at shop {shop}"
    if limit == CONCURRENCY:
        maximum = quota.max_concurrent or 0
        message = f"{who} has {used} call(s) in flight, its quota of {maximum:,} concurrent calls"
    else:
        maximum = quota.max_instructions_per_s or 0
        debt = f", {-used:,} in debt" if used < 0 else ""
        message = (
            f"{who} used its quota of {maximum:,} instructions per second{debt}: refused until it refills"
        )
    return Refusal(shop, app or None, limit, maximum, message)
