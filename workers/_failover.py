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

from celery.worker.consumer import Consumer as CeleryConsumer

RETRY_FIRST_S = 0.2
RETRY_STEP_S = 0.1
RETRY_MAX_S = 0.5


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
