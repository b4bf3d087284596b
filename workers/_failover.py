"""The worker's consumer, reconnecting to the broker at a pace that fits a failover.

Celery's consumer reconnects on kombu's fixed schedule (``ensure_connection``'s defaults: after
2 s, then 4, 6... up to 30 s), and no setting changes it. After a Sentinel failover (the new
primary is there about down-after + 1.2 s after the fault) that schedule let the worker consume
again only at 6.1 s (down-after 1000 ms) or 12.1 s (5000 ms), measured; retrying every 0.2 s
rising to 0.5 s brings it back at most half a second after the new primary is named. The same
holds for a restarted Redis. Each attempt is a few round trips to the sentinels (or one refused
connect), so a Redis that stays down costs two attempts a second. The public hooks
are used: Celery's ``worker_consumer`` setting names this class, and it only adds the retry
intervals to the one call Celery makes.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import bootsteps
from celery.worker.consumer import Consumer as CeleryConsumer

from scriptpool.config import get_logger
from scriptpool.config.redis import is_sentinel, primary_address, redis_pool

log = get_logger("worker")

RETRY_FIRST_S = 0.2
RETRY_STEP_S = 0.1
RETRY_MAX_S = 0.5
# How often the consumer compares its BRPOP connection with the primary the sentinels name.
PRIMARY_CHECK_S = 1.0


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, with broker reconnects after 0.2, 0.3, 0.4, then every 0.5 s."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=RETRY_FIRST_S,
            interval_step=RETRY_STEP_S,
            interval_max=RETRY_MAX_S,
        )
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection  # the connection's own method again


class PrimaryWatch(bootsteps.StartStopStep):  # type: ignore[misc]
    """Behind Sentinel: drop the consumer's BRPOP connection when the sentinels name another
    primary than the one it is on, so the worker reconnects to the promoted replica.

    kombu drops a BRPOP that gets no reply for 1 + ``health_check_interval`` (2) s, which catches a
    primary that is still frozen. A primary that froze for less than that but long enough to be
    replaced (down-after + ~1.2 s: 2.2 s at down-after 1000 ms) answers again, still calling itself
    master, and the worker went on consuming from it, deaf to its shard, until the sentinels
    converted it about 10 s later (measured: first answer at 12.9 s after a 2.8 s freeze). The
    address comes from ``config``'s process-wide primary watch (a thread asking the sentinels
    every second), so this check, which runs in the worker's event loop, never waits on a
    sentinel. It reads kombu's channels (``transport.cycle._channels``, the BRPOP connection is
    ``channel.client.connection``) and disconnects as kombu's own BRPOP health check does.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._pool: Any = None
        self._timer: Any = None

    def start(self, c: Any) -> None:
        url = c.app.settings.redis_url
        if not is_sentinel(url) or c.hub is None:
            return
        if self._pool is None:
            self._pool = redis_pool(url, timeout=1.0, connect_timeout=0.25)
            primary_address(self._pool)  # now, not at the watch's next round
        self._timer = c.hub.call_repeatedly(PRIMARY_CHECK_S, self._check, c)

    def _check(self, c: Any) -> None:
        primary = self._pool.master_address
        connection = getattr(c, "connection", None)
        cycle = getattr(getattr(connection, "transport", None), "cycle", None)
        if primary is None or cycle is None:
            return
        for channel in list(getattr(cycle, "_channels", ())):
            client = channel.__dict__.get("client")  # a cached property: never create it here
            brpop = getattr(client, "connection", None)
            host = getattr(brpop, "host", None)
            if brpop is None or host is None or getattr(brpop, "_sock", None) is None:
                continue
            if (host, brpop.port) != tuple(primary):
                log.warning(
                    "broker_primary_moved", was=f"{host}:{brpop.port}", now=f"{primary[0]}:{primary[1]}"
                )
                brpop.disconnect()

    def stop(self, c: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
