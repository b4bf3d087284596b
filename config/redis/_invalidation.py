"""Keeps hot caches coherent: deploys, rollbacks and EP definitions publish, every worker (and
every client that caches bound input queries) listens."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from scriptpool.config._logging import get_logger
from scriptpool.config.redis._clients import redis_client
from scriptpool.config.redis._primary import PrimaryCheck
from scriptpool.config.redis._reconnect import Reconnector

log = get_logger("worker")

# How long a SUBSCRIBE may wait for its confirmation (the connection's own timeout).
_CONFIRM_S = 5.0


class InvalidationListener:
    """A daemon thread subscribed to the invalidation channel.

    On a message it forgets the named binding (or EP). If the subscription breaks, messages may
    have been missed, so on every (re)subscription it forgets everything first.

    Behind Sentinel it also resubscribes when the sentinels name another primary than the one it
    listens to: a primary that froze and came back keeps the subscription open and silent while
    deploys are published on the promoted replica (measured: 850 invalidations missed over a
    10 s freeze without this check).
    """

    def __init__(
        self,
        redis_url: str,
        channel: str,
        invalidate: Callable[[str | None, str | None], None],
        *,
        name: str = "invalidation_listener",
        logger: Any = None,
        on_data: Callable[[Any], None] | None = None,
    ):
        self._url = redis_url
        self._channel = channel
        self._invalidate = invalidate
        # Data writes publish on the same channel (scriptpool.config.store): their messages go
        # to on_data, never to invalidate (whose (None, None) would forget every binding),
        # decoded once here (on_data gets the JSON object: parse_invalidation takes it as is).
        self._on_data = on_data
        self._log = logger or log  # the worker's by default; a client logs as the client
        self._subscribed = threading.Event()
        # A short cap: until it subscribes again a worker may serve a binding a deploy replaced
        # (the resubscription then forgets everything), so it retries at least twice a second.
        self._loop = Reconnector(name, self._session, max_backoff_s=0.5, logger=self._log)

    def start(self) -> InvalidationListener:
        """Start listening on a daemon thread; returns itself."""
        self._loop.start()
        return self

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the subscription; whether it is subscribed."""
        return self._subscribed.wait(timeout)

    @property
    def subscribed(self) -> bool:
        """Subscribed now: what it has not been told of since has not been published."""
        return self._subscribed.is_set()

    def stop(self) -> None:
        """Stop listening (the thread ends within its read timeout)."""
        self._loop.stop()

    def _session(self, loop: Reconnector) -> None:
        client = redis_client(self._url, timeout=5, connect_timeout=1)
        try:
            pubsub = client.pubsub()
            pubsub.subscribe(self._channel)
            # Subscribed only once Redis confirms it: a message published before that is not
            # delivered, so until then nothing cached may count as coherent.
            if not self._confirmed(pubsub, loop):
                return
            self._invalidate(None, None)  # anything published while we were away is lost
            self._subscribed.set()
            loop.healthy()
            primary = PrimaryCheck(client.connection_pool)
            while not loop.stopping.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is not None and message.get("type") == "message":
                    self.apply(message["data"])
                if primary.moved(pubsub.connection):
                    raise redis.ConnectionError("Sentinel moved the primary: subscribing there")
        finally:
            self._subscribed.clear()
            client.close()

    @staticmethod
    def _confirmed(pubsub: Any, loop: Reconnector) -> bool:
        """Wait for the SUBSCRIBE confirmation (False: stopping meanwhile); a connection error
        if it does not come within the connection's timeout."""
        until = time.monotonic() + _CONFIRM_S
        while not loop.stopping.is_set():
            message = pubsub.get_message(timeout=0.5)
            if message is not None and message.get("type") == "subscribe":
                return True
            if time.monotonic() > until:
                raise redis.ConnectionError("Redis did not confirm the subscription")
        return False

    def apply(self, data: bytes) -> None:
        """Forget what one invalidation message names (a data write's goes, decoded, to
        ``on_data``); a malformed one is logged and ignored."""
        try:
            event = json.loads(data)
            if "data" in event:  # a data write's message, not a binding's
                if self._on_data is not None:
                    self._on_data(event)
                return
            self._invalidate(event.get("ep"), event.get("shop_id"))
        except (ValueError, AttributeError, TypeError, RecursionError):
            self._log.warning("invalidation_message_malformed", data=repr(data)[:200])
