"""Keeps a worker's hot caches coherent: deploys and rollbacks publish, every worker listens."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import redis
import structlog

log = structlog.get_logger("scriptpool.worker")


class InvalidationListener:
    """A daemon thread subscribed to the invalidation channel.

    On a message it forgets the named binding (or EP). If the subscription breaks, messages may
    have been missed, so it forgets everything and resubscribes with backoff.
    """

    def __init__(self, redis_url: str, channel: str, invalidate: Callable[[str | None, str | None], None]):
        self._url = redis_url
        self._channel = channel
        self._invalidate = invalidate
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="invalidation", daemon=True)

    def start(self) -> InvalidationListener:
        self._thread.start()
        return self

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            client = redis.Redis.from_url(self._url, socket_connect_timeout=1, socket_timeout=5)
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(self._channel)
                self._invalidate(None, None)  # anything published while we were away is lost
                self._subscribed.set()
                backoff = 0.05
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._apply(message["data"])
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self._subscribed.clear()
                log.warning("invalidation_listener_reconnecting", error=str(exc), backoff_s=backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                client.close()

    def _apply(self, data: bytes) -> None:
        try:
            event = json.loads(data)
            self._invalidate(event.get("ep"), event.get("shop_id"))
        except (ValueError, AttributeError):
            log.warning("invalidation_message_malformed", data=repr(data)[:200])
