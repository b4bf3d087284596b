"""One BLPOP loop per client process delivers replies to the threads and tasks waiting for them."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, cast

import msgpack
import redis
import structlog

log = structlog.get_logger("scriptpool.client")


class Waiter:
    """The slot one caller waits on; resolved at most once, from the dispatcher thread."""

    __slots__ = ("_event", "_future", "_loop", "reply")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.reply: dict[str, Any] | None = None
        self._event = threading.Event()
        self._loop = loop
        self._future: asyncio.Future[dict[str, Any]] | None = loop.create_future() if loop else None

    def resolve(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self._event.set()
        if self._loop is not None and self._future is not None:
            self._loop.call_soon_threadsafe(_set_result, self._future, reply)

    def wait(self, timeout: float) -> dict[str, Any] | None:
        """Block until resolved or ``timeout`` seconds pass; never longer, whatever Redis does."""
        self._event.wait(max(timeout, 0.0))
        return self.reply

    async def wait_async(self, timeout: float) -> dict[str, Any] | None:
        assert self._future is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), max(timeout, 0.0))
        except TimeoutError:
            return self.reply


def _set_result(future: asyncio.Future[dict[str, Any]], reply: dict[str, Any]) -> None:
    if not future.done():
        future.set_result(reply)


class ReplyDispatcher:
    """Reads this client's reply list and resolves the matching waiters.

    Callers wait on their own :class:`Waiter` with their own deadline, so a Redis outage can
    delay replies but never a caller; the loop reconnects by itself.
    """

    def __init__(self, redis_url: str, reply_key: str) -> None:
        self.reply_key = reply_key
        self._url = redis_url
        self._waiters: dict[str, Waiter] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scriptpool-replies", daemon=True)
        self._thread.start()

    def expect(self, job_id: str, loop: asyncio.AbstractEventLoop | None = None) -> Waiter:
        waiter = Waiter(loop)
        with self._lock:
            self._waiters[job_id] = waiter
        return waiter

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._waiters.pop(job_id, None)

    def pending(self) -> int:
        with self._lock:
            return len(self._waiters)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)

    def _run(self) -> None:
        backoff = 0.01
        while not self._stop.is_set():
            client = redis.Redis.from_url(self._url, socket_connect_timeout=0.5, socket_timeout=2.0)
            try:
                while not self._stop.is_set():
                    item = client.blpop([self.reply_key], timeout=1)
                    if item is None:
                        continue
                    # Wake this caller first; draining what queued up behind it costs a round trip.
                    self._deliver(cast(bytes, item[1]))
                    while more := client.lpop(self.reply_key, 256):
                        for raw in cast("list[bytes]", more):
                            self._deliver(raw)
                    backoff = 0.01
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("reply_dispatcher_reconnecting", error=str(exc), backoff_s=backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                client.close()

    def _deliver(self, raw: bytes) -> None:
        try:
            reply = msgpack.unpackb(raw, raw=False)
            job_id = reply["job_id"]
        except (ValueError, KeyError, TypeError, msgpack.UnpackException):
            log.warning("reply_malformed", size=len(raw))
            return
        with self._lock:
            waiter = self._waiters.pop(job_id, None)
        if waiter is not None:
            waiter.resolve(reply)
