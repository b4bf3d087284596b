"""One reader per client process delivers replies to the threads and tasks waiting for them.

Every item on a reply list is read as hostile: anyone who can write to Redis can push anything
there. An item that is not a map with a string ``job_id`` is logged (``reply_malformed``) and
skipped, and the rest of its read is delivered; an item that names a waiting caller goes to that
caller as it is, and the caller's ``Reply.from_wire`` decides whether it is a reply (the client
answers ``invalid_reply`` at once when it is not). Nothing an item holds can stop the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, Protocol

import msgpack
import redis

from scriptpool.config import get_logger
from scriptpool.config.redis import PrimaryCheck, Reconnector, redis_pool
from scriptpool.config.wire import Taken, redis_command

log = get_logger("client")

# Replies read per round trip once several are queued up.
_DRAIN = b"256"
_BLOCK_S = b"1"
# Skipped if read: close() once pushed it to wake its own blocked read (not msgpack: a worker
# never sends it); a list left from then may still hold one.
_STOP = b"scriptpool:stop"


class ReplyListener(Protocol):
    """Told what happens to the message its job went out in (``scriptpool.producer._batching.Message``)."""

    def taken(self) -> None: ...

    def replied(self, waiter: Waiter) -> None: ...


class Waiter:
    """The slot one caller waits on; resolved at most once, from the dispatcher thread (or failed
    by whoever publishes the job, if that fails).

    A thread waits on a held lock that resolving releases: one futex operation each side, where
    ``threading.Event`` costs a condition variable and a lock per wait (``Event.set`` alone was
    16% of the client's GIL time with 8 threads, in py-spy). A coroutine awaits a future instead.
    """

    __slots__ = ("_done", "_future", "_gate", "_loop", "abandoned", "failure", "listener", "reply")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.reply: dict[str, Any] | None = None
        self.failure: str | None = None  # why the job never reached the queue
        # The message its job went out in, while the job counts there (``scriptpool.producer._batching``).
        self.listener: ReplyListener | None = None
        self.abandoned = False  # its caller stopped waiting without a reply
        self._loop = loop
        self._done = False
        self._future: asyncio.Future[None] | None = None
        self._gate: threading.Lock | None = None
        if loop is not None:
            self._future = loop.create_future()
        else:
            self._gate = threading.Lock()
            self._gate.acquire()

    def resolve(self, reply: dict[str, Any], wakes: dict[Any, list[Any]] | None = None) -> None:
        """Hand over ``reply``. A coroutine's wake-up is added to ``wakes`` when given, so the
        dispatcher wakes each event loop once per read, not once per reply."""
        self.reply = reply
        if wakes is not None and self._loop is not None and not self._done:
            self._done = True
            wakes.setdefault(self._loop, []).append(self._future)
            return
        self._wake()

    def fail(self, reason: str) -> None:
        """The job could not be enqueued: wake the caller now instead of at its deadline."""
        self.failure = reason
        self._wake()

    def _wake(self) -> None:
        if self._done:
            return
        self._done = True
        if self._gate is not None:
            with contextlib.suppress(RuntimeError):  # a reply racing a publish failure: once is enough
                self._gate.release()
        elif self._loop is not None and self._future is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits
                self._loop.call_soon_threadsafe(_set_done, self._future)

    def wait(self, timeout: float) -> dict[str, Any] | None:
        """Block until resolved or ``timeout`` seconds pass; never longer, whatever Redis does."""
        assert self._gate is not None, "an asyncio waiter is awaited with wait_async"
        self._gate.acquire(timeout=max(timeout, 0.0))
        return self.reply

    async def wait_async(self, timeout: float) -> dict[str, Any] | None:
        assert self._future is not None, "a thread's waiter is waited on with wait"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._future), max(timeout, 0.0))
        return self.reply


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _set_all_done(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


class ReplyDispatcher:
    """Reads this client's reply list and resolves the matching waiters.

    Callers wait on their own :class:`Waiter` with their own deadline, so a Redis outage can
    delay replies but never a caller; the loop reconnects by itself.

    One blocking pop per round trip, on a connection of its own with packed commands: BLMPOP
    (Redis 7) returns everything queued up to 256 replies at once; on older servers, BLPOP and,
    while other callers still wait, an LPOP of up to 256 more.
    """

    multi_pop = True  # BLMPOP until the server says it does not know it (tests turn it off)

    def __init__(
        self, redis_url: str, reply_key: str, on_reconnect: Callable[[], None] | None = None
    ) -> None:
        """``on_reconnect`` runs (on the reader's thread) each time the reader connects again
        after losing its connection: what the lost connection was reading never arrives."""
        self.reply_key = reply_key
        self.malformed = 0  # items skipped because no job id could be read from them
        self._url = redis_url
        self._on_reconnect = on_reconnect
        self._sessions = 0
        self._waiters: dict[str, Waiter] = {}
        self._lock = threading.Lock()
        self._blmpop = redis_command(b"BLMPOP", _BLOCK_S, b"1", reply_key, b"LEFT", b"COUNT", _DRAIN)
        self._blpop = redis_command(b"BLPOP", reply_key, _BLOCK_S)
        self._lpop = redis_command(b"LPOP", reply_key, _DRAIN)
        self._delete = redis_command(b"DEL", reply_key)
        self._use_multi_pop = self.multi_pop
        self._connection: Any = None  # the session's, while it has one: stop() closes it
        # A short cap: replies resume at most 0.25 s after Redis (or a promoted replica) answers
        # again, for one refused connect per 0.25 s while it does not.
        self._loop = Reconnector(
            "reply_dispatcher", self._session, initial_backoff_s=0.01, max_backoff_s=0.25, logger=log
        )
        self._loop.start()

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

    def close(self, client: redis.Redis | None = None) -> None:
        """Stop reading (:meth:`stop`, then :meth:`join` for up to a second). With ``client``,
        also delete the list."""
        self.stop()
        if client is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                client.delete(self.reply_key)
        self.join(1.0)

    def stop(self) -> None:
        """Stop reading now: the session's connection is closed under its blocking read, which
        then ends at once, whether Redis answers or not (a command pushed to wake it would wait
        out the socket timeout on a Redis that does not)."""
        self._loop.stopping.set()
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(Exception):  # closing is all that is wanted of it
                connection.disconnect()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the reader's thread to end (it is a daemon: one
        still connecting to a Redis that does not answer ends by its socket timeout)."""
        self._loop.stop(timeout=timeout)

    def _session(self, loop: Reconnector) -> None:
        pool = redis_pool(self._url, timeout=2.0, connect_timeout=0.5)
        connection: Any = pool.make_connection()  # redis-py types these partly
        self._connection = connection
        primary = PrimaryCheck(pool)
        try:
            if loop.stopping.is_set():
                return  # stop() came before the connection it would have closed
            # Now, and through the pool's own address lookup: on a Sentinel pool only connect()
            # asks the sentinels, a packed command would dial an old or default address.
            connection.connect()
            self._sessions += 1
            if self._sessions > 1 and self._on_reconnect is not None:
                try:
                    self._on_reconnect()
                except Exception:  # never let it stop the replies
                    log.exception("reply_reconnect_hook_failed")
            while not loop.stopping.is_set():
                if primary.moved(connection):
                    # A primary that froze and came back still answers, but workers now reply to
                    # the promoted one: read there.
                    raise redis.ConnectionError("Sentinel moved the primary: reading replies there")
                try:
                    items = self._pop_many(connection) if self._use_multi_pop else self._pop_one(connection)
                except redis.ResponseError as exc:
                    if self._use_multi_pop and "unknown command" in str(exc).lower():
                        self._use_multi_pop = False  # Redis 6: BLPOP, then LPOP while callers wait
                        continue
                    if not str(exc).startswith("WRONGTYPE"):
                        raise
                    # Anyone who can write to Redis can put another kind of value under this
                    # client's key: it holds no reply, and workers cannot push any onto it (they
                    # log reply_rejected) until it is a list again.
                    log.warning("reply_list_replaced", key=self.reply_key)
                    connection.send_packed_command([self._delete], check_health=False)
                    connection.read_response()
                    continue
                loop.healthy()
                wakes: dict[Any, list[Any]] = {}
                for raw in items:
                    self._deliver_safely(raw, wakes)
                for event_loop, futures in wakes.items():
                    with contextlib.suppress(RuntimeError):  # that loop is closed
                        event_loop.call_soon_threadsafe(_set_all_done, futures)
        except Exception:
            if loop.stopping.is_set():
                return  # stop() closed the connection under the read: whatever that raised
            raise
        finally:
            self._connection = None
            connection.disconnect()
            pool.disconnect()

    def _pop_many(self, connection: Any) -> list[bytes]:
        connection.send_packed_command([self._blmpop], check_health=False)
        response = connection.read_response()
        return list(response[1]) if response else []

    def _pop_one(self, connection: Any) -> list[bytes]:
        connection.send_packed_command([self._blpop], check_health=False)
        response = connection.read_response()
        if not response:
            return []
        # Wake this caller first; draining what queued up behind it costs a round trip, worth it
        # only while other callers wait (replies nobody waits for are read by the next pop).
        self._deliver_safely(response[1])
        if not self._waiters:
            return []
        connection.send_packed_command([self._lpop], check_health=False)
        return list(connection.read_response() or [])

    def _deliver_safely(self, raw: bytes, wakes: dict[Any, list[Any]] | None = None) -> None:
        try:
            self._deliver(raw, wakes)
        except Exception:  # a bug: it costs this item, never the rest of the read
            log.exception("reply_delivery_failed", size=len(raw))

    def _deliver(self, raw: bytes, wakes: dict[Any, list[Any]] | None = None) -> None:
        if raw == _STOP:
            return
        reply = _readable(raw)
        job_id = None if reply is None else reply.get("job_id")
        if reply is None or type(job_id) is not str:
            self.malformed += 1
            log.warning("reply_malformed", size=len(raw), problem=_problem(reply))
            return
        taken = Taken.is_taken(reply)  # a worker took the message whose first job this is
        with self._lock:
            waiter = self._waiters.get(job_id) if taken else self._waiters.pop(job_id, None)
        if waiter is None:
            return
        listener = waiter.listener
        if not taken:
            waiter.resolve(reply, wakes)
        if listener is not None:
            try:
                if taken:
                    listener.taken()
                else:
                    listener.replied(waiter)
            except Exception:  # never let a listener stop the deliveries
                log.exception("reply_listener_failed", job=job_id[:64])


def _refuse_ext(code: int, data: bytes) -> Any:
    # Our replies carry no extension types: an item with one is not a reply.
    raise ValueError(f"extension type {code}")


def _readable(raw: bytes) -> dict[Any, Any] | None:
    """The map ``raw`` holds, or None: not MessagePack (or nested past msgpack's depth limit,
    or with an extension type), or not a map."""
    try:
        item = msgpack.unpackb(raw, raw=False, ext_hook=_refuse_ext)
    except Exception:  # msgpack raises ValueError and its own kinds; the item is lost either way
        return None
    return item if type(item) is dict else None


def _problem(reply: dict[Any, Any] | None) -> str:
    return "not a MessagePack map" if reply is None else "no string job_id"
