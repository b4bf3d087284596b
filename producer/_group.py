"""One shard group's Redis, as a client holds it: its connections, and its cache of EP definitions."""

from __future__ import annotations

import contextlib
import json
import threading
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis

from scriptpool.config import (
    ExtensionPointReader,
    Keys,
    Limits,
    Settings,
    ShardGroup,
    get_logger,
    largest_input_bytes,
    scale_factor,
    scaled_limits,
)
from scriptpool.config.errors import ClientClosed, ScriptpoolError
from scriptpool.config.redis import redis_client
from scriptpool.producer._batching import Lane
from scriptpool.producer._publisher import TaskPublisher
from scriptpool.producer._queries import QueryBook
from scriptpool.producer._replies import ReplyDispatcher

log = get_logger("client")

# What a Redis that cannot be reached, or does not answer, raises through redis-py.
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, OSError)
_EP_CACHE_S = 5.0
# Threads per shard group that read EP definitions: a read is one GET, once per EP every 5 s.
_EP_READERS = 2


@dataclass(frozen=True, slots=True)
class EpLimits:
    """What the client knows of an EP: its limits, its scale rules, and its input schema (GraphQL
    SDL; None: calls send their input as it is, with no query to project it through)."""

    limits: Limits
    scale: dict[str, float]
    input_graphql: str | None = None

    def for_input(self, value: Any, payload: bytes) -> Limits:
        """The limits an input is checked against: an input over the base limit gets the limits
        its scale factor gives (decoding it only then), so the client never refuses an input
        that the worker's scaling would allow."""
        if not self.scale or len(payload) <= self.limits.input_bytes:
            return self.limits
        if len(payload) > largest_input_bytes(self.limits):
            return self.limits
        if isinstance(value, (bytes, bytearray, memoryview)):
            try:
                value = json.loads(payload)
            except (ValueError, RecursionError):
                return self.limits  # not JSON: refused by size here, or by the worker
        return scaled_limits(self.limits, scale_factor(value, self.scale))


class GroupLink:
    """This client's connections to one shard group's Redis: the publisher, the reply reader
    and the EP reader. Groups share nothing, so one group's Redis failing slows no other's calls.

    ``failing``: the last publish or EP read on this group failed. Until one succeeds again,
    callers publish from the background threads and wait only on their own deadline, since a
    Redis that froze (or a primary cut off before Sentinel replaces it) keeps connections open
    and silent, and a new connection's handshake would wait out the socket timeout (1 s) on it.

    EP definitions are read off the callers' threads (:meth:`read_limits`), on the group's own
    reader threads (a group whose Redis does not answer holds up only its own reads), one read
    per EP in flight however many callers miss the cache together, and each caller waits for it
    only until its own deadline: a GET on a Redis that accepts connections and never answers
    would otherwise hold the caller (or an event loop) for the socket timeout.
    """

    def __init__(
        self,
        group: ShardGroup,
        keys: Keys,
        client_id: str,
        settings: Settings,
    ) -> None:
        self.group = group
        self.failing = False
        # Redis answered something of ours: until then no worker can have replied to this
        # client, so close() has no reply list to delete there (nor waits on that Redis for it).
        self.answered = False
        self.redis = redis_client(group.url, timeout=1.0, connect_timeout=0.25)
        self.tasks = TaskPublisher(self.redis, Keys.TASK)
        self.replies = ReplyDispatcher(group.url, keys.replies(client_id), self._replies_reconnected)
        # The lanes of the shards this group serves (the client adds them): reset on a reconnect.
        self.lanes: list[Lane[Any]] = []
        self.limits: ExtensionPointReader[EpLimits] = ExtensionPointReader(
            self.redis,
            keys,
            lambda ep: EpLimits(ep.limits(settings.limits), dict(ep.scale), ep.input_graphql),
            ttl_s=_EP_CACHE_S,
        )
        self._reads: dict[str, Future[EpLimits]] = {}
        self._reads_lock = threading.Lock()
        self._readers = ThreadPoolExecutor(_EP_READERS, thread_name_prefix=f"scriptpool-ep-{group.name}")
        # The input queries bound at each (EP, shop) of EPs with an input schema, read on the same
        # threads; its listener starts with the first such EP (a client of EPs without one holds
        # no subscription).
        self.queries = QueryBook(
            self.redis, keys, group.url, self._readers, self.limits.invalidate, group.name
        )

    def read_limits(self, ep: str) -> Future[EpLimits]:
        """EP ``ep``'s limits, read from Redis on one of this group's reader threads; a read
        already in flight for ``ep`` is shared. The future holds what the read raised: a Redis
        error, :class:`UnknownExtensionPoint`, :class:`ConfigurationError`, or
        :class:`ClientClosed` if the client closes before it is read."""
        with self._reads_lock:
            future = self._reads.get(ep)
            if future is not None:
                return future
            future = self._reads[ep] = Future()
        try:
            self._readers.submit(self._read, ep, future)
        except RuntimeError:  # shut down: the client closed meanwhile
            self._settle(ep, future, ClientClosed("the client is closed"))
        return future

    def stop_reads(self) -> None:
        """No more EP reads: whoever waits on one hears :class:`ClientClosed` now (a read still
        queued will never run; one running ends with the connections, :meth:`release`)."""
        self._readers.shutdown(wait=False, cancel_futures=True)
        self.queries.stop()
        with self._reads_lock:
            pending = list(self._reads.items())
        for ep, future in pending:
            self._settle(ep, future, ClientClosed("the client is closed"))

    def _read(self, ep: str, future: Future[EpLimits]) -> None:
        try:
            value = self.limits.get(ep)
        except TRANSPORT_ERRORS as exc:
            self.failing = True
            self._settle(ep, future, exc)
        except ScriptpoolError as exc:  # an answer all the same: not defined, or not usable
            self.failing, self.answered = False, True
            self._settle(ep, future, exc)
        except Exception as exc:  # a bug: its callers still get an answer, not a hang
            log.exception("ep_read_failed", ep=ep, group=self.group.name)
            self._settle(ep, future, exc)
        else:
            self.failing, self.answered = False, True
            self._settle(ep, future, value)

    def _settle(self, ep: str, future: Future[EpLimits], result: EpLimits | Exception) -> None:
        with self._reads_lock:
            if self._reads.get(ep) is future:
                del self._reads[ep]
        with contextlib.suppress(InvalidStateError):  # settled already, by close or by the read
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _replies_reconnected(self) -> None:
        """(The reply reader's thread.) It connected again: what it was reading may be lost, so
        this group's lanes stop waiting to hear about their messages."""
        for lane in self.lanes:
            lane.reset()

    def delete_replies(self) -> None:
        """Delete this client's reply list (best effort: it expires by itself otherwise)."""
        if self.answered:
            with contextlib.suppress(*TRANSPORT_ERRORS):
                self.redis.delete(self.replies.reply_key)

    def release(self) -> None:
        """Close this group's connections now, in use or not: a thread still waiting on one
        (a publish or a read on a Redis that does not answer) gets an error at once."""
        self.redis.close()
        self.redis.connection_pool.disconnect()  # the pool is ours: its sockets close now, not at GC
