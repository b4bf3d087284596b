"""Applying the writes scripts returned (``storeWrites``), after the reply.

The runtime has taken each successful call's writes out of its output and checked them
(``scriptpool.runtime._writes``); here the worker applies them on the job's own thread, once the
reply has gone: one Redis EVAL per app's run (``scriptpool.config.store.apply_writes``), all of
its writes or none, so a worker killed meanwhile loses at most that run's writes, whole, never
another's. What the store refuses then (a scope full of keys, a shop over its bytes: none of
that run's writes is applied) can reach no caller any more: it is logged
(``store_write_refused``) and counted (``scriptpool_store_writes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scriptpool.config import Settings, get_logger
from scriptpool.config.store import apply_writes
from scriptpool.workers import _telemetry as telemetry

if TYPE_CHECKING:
    import redis

    from scriptpool.config.wire import Job
    from scriptpool.runtime import AppWrites

log = get_logger("worker")


class StoreWriter:
    """Applies the writes of this worker's successful calls to its shard group's Redis."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._redis = client
        self._keys = settings.keys

    def apply(self, job: Job, writes: list[AppWrites], *, replied: bool) -> None:
        """Apply each app's writes of ``job``'s successful call, one atomic step per app.
        ``replied`` False (the caller had given up and got no reply): none are applied, as the
        caller never saw the run that asked for them."""
        if not replied:
            telemetry.record_store_writes("late", sum(len(each.writes) for each in writes))
            return
        for each in writes:
            planned = [(w.scope, w.key, w.value) for w in each.writes]
            try:
                refusal = apply_writes(
                    self._redis,
                    self._keys,
                    each.app,
                    job.shop_id,
                    job.session,
                    planned,
                    session_ttl_s=each.session_ttl_s,
                )
            except Exception as exc:  # Redis lost: this run's writes are lost, whole
                telemetry.record_store_writes("failed", len(planned))
                log.warning(
                    "store_write_failed",
                    job=job.id,
                    ep=job.ep,
                    shop=job.shop_id,
                    app=each.app,
                    writes=len(planned),
                    error=repr(exc)[:200],
                )
                continue
            if refusal is None:
                telemetry.record_store_writes("applied", len(planned))
                continue
            telemetry.record_store_writes("refused", len(planned))
            log.warning(
                "store_write_refused",
                job=job.id,
                ep=job.ep,
                shop=job.shop_id,
                app=each.app,
                writes=len(planned),
                index=refusal.index,
                limit=refusal.limit,
                scope=refusal.scope,
                key=refusal.key[:80],
                current=refusal.current,
                maximum=refusal.maximum,
                reason=refusal.message[:300],
            )
