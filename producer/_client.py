"""The host API: enqueue a job for the shop's shard and wait for it, degrading to a fallback."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass
from typing import Any

import redis

from scriptpool.config import (
    ErrorInfo,
    ExtensionPointReader,
    Job,
    Keys,
    Limits,
    Reply,
    Settings,
    ShardGroup,
    check_ep,
    check_input_size,
    check_shop_id,
    encode_input,
    get_logger,
    largest_input_bytes,
    live_workers,
    redis_client,
    scale_factor,
    scaled_limits,
    shard_count_disagreement,
    shard_for,
)
from scriptpool.config.errors import (
    BrokerUnavailable,
    CircuitOpen,
    ClientClosed,
    ConfigurationError,
    DeadlineExceeded,
    InvalidArgument,
    InvalidReply,
    ScriptpoolError,
    WorkerFailed,
    error_class_for,
)
from scriptpool.producer._batching import BatchPolicy, Lane, LaneClock
from scriptpool.producer._breaker import BreakerBoard, BreakerPolicy, CircuitBreaker
from scriptpool.producer._outcome import ERROR, FALLBACK, OK, Outcome, Timings
from scriptpool.producer._publisher import TaskPublisher
from scriptpool.producer._replies import ReplyDispatcher, Waiter

log = get_logger("client")

_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, OSError)
_EP_CACHE_S = 5.0
# After a timeout, the workers' shard count is compared with ours again at most this often.
_SHARD_COUNT_RECHECK_S = 30.0
# Callers wait in checkout paths; anything longer is a mistake (inf would overflow the wait).
MAX_TIMEOUT_S = 600
_SHARD_CACHE = 100_000
# A publish waits for Redis's acknowledgement at most this long (the client's socket timeout),
# and at least this long, however little time its caller has left.
_PUBLISH_TIMEOUT_S = 1.0
_PUBLISH_MIN_S = 0.001
# close() waits this long at most for its reply lists to be deleted (a Redis that answers takes
# about a millisecond); then it drops its connections, which ends any read still waiting on them.
_CLOSE_S = 0.25
# Threads per shard group that read EP definitions: a read is one GET, once per EP every 5 s.
_EP_READERS = 2


class _GroupLink:
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
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self.group = group
        self.failing = False
        # Redis answered something of ours: until then no worker can have replied to this
        # client, so close() has no reply list to delete there (nor waits on that Redis for it).
        self.answered = False
        self.redis = redis_client(group.url, timeout=1.0, connect_timeout=0.25)
        self.tasks = TaskPublisher(self.redis, Keys.TASK)
        self.replies = ReplyDispatcher(group.url, keys.replies(client_id), on_reconnect)
        self.limits: ExtensionPointReader[_EpLimits] = ExtensionPointReader(
            self.redis,
            keys,
            lambda ep: _EpLimits(ep.limits(settings.limits), dict(ep.scale)),
            ttl_s=_EP_CACHE_S,
        )
        self._reads: dict[str, Future[_EpLimits]] = {}
        self._reads_lock = threading.Lock()
        self._readers = ThreadPoolExecutor(_EP_READERS, thread_name_prefix=f"scriptpool-ep-{group.name}")

    def read_limits(self, ep: str) -> Future[_EpLimits]:
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
        with self._reads_lock:
            pending = list(self._reads.items())
        for ep, future in pending:
            self._settle(ep, future, ClientClosed("the client is closed"))

    def _read(self, ep: str, future: Future[_EpLimits]) -> None:
        try:
            value = self.limits.get(ep)
        except _TRANSPORT_ERRORS as exc:
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

    def _settle(self, ep: str, future: Future[_EpLimits], result: _EpLimits | Exception) -> None:
        with self._reads_lock:
            if self._reads.get(ep) is future:
                del self._reads[ep]
        with contextlib.suppress(InvalidStateError):  # settled already, by close or by the read
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def delete_replies(self) -> None:
        """Delete this client's reply list (best effort: it expires by itself otherwise)."""
        if self.answered:
            with contextlib.suppress(*_TRANSPORT_ERRORS):
                self.redis.delete(self.replies.reply_key)

    def release(self) -> None:
        """Close this group's connections now, in use or not: a thread still waiting on one
        (a publish or a read on a Redis that does not answer) gets an error at once."""
        self.redis.close()
        self.redis.connection_pool.disconnect()  # the pool is ours: its sockets close now, not at GC


class Client:
    """Runs scripts on the pool. Thread-safe and asyncio-friendly; keep one per process.

    ``run``/``run_async`` never raise for runtime failures: they return an :class:`Outcome`
    whose ``output`` is the fallback, by the call's deadline whatever Redis does (it may accept
    connections and never answer). Mistakes in the call itself (bad shop id, unknown EP, input
    that is not JSON or too large, a non-positive timeout) raise before anything is enqueued.
    A call after :meth:`close` gets its fallback at once, with error code ``client_closed``.

    A call goes shop -> shard -> shard group (``SCRIPTPOOL_SHARD_GROUPS``): the client keeps one
    set of connections per group and publishes to, and hears replies from, the shop's group.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        breaker: BreakerPolicy | None = None,
        batching: BatchPolicy | None = None,
    ) -> None:
        if not isinstance(settings, Settings):
            raise InvalidArgument(
                f"Client takes a Settings, got {_shown(settings)}: pass Settings.from_env() (the "
                "SCRIPTPOOL_* variables, as the workers read them) or Settings(redis_url=...)"
            )
        if breaker is not None and not isinstance(breaker, BreakerPolicy):
            raise InvalidArgument(f"breaker must be a BreakerPolicy, got {_shown(breaker)}")
        if batching is not None and not isinstance(batching, BatchPolicy):
            raise InvalidArgument(f"batching must be a BatchPolicy, got {_shown(batching)}")
        self.settings = settings
        self._closed = False
        self.client_id = os.urandom(16).hex()
        self._keys = settings.keys
        self._publisher = ThreadPoolExecutor(max_workers=8, thread_name_prefix="scriptpool-publish")
        self.batching = batching or BatchPolicy()
        self._clock = LaneClock()  # frees a lane's slot at its message's deadline at the latest
        self._lanes = [
            Lane(
                self.batching,
                self._publish,
                self._publish_failed,
                self._background,
                _TRANSPORT_ERRORS,
                self._clock.schedule,
            )
            for _ in range(settings.shards)
        ]
        self._link_of_shard: list[_GroupLink] = []
        self._groups = [
            _GroupLink(
                group,
                self._keys,
                self.client_id,
                settings,
                functools.partial(self._replies_reconnected, group.url),
            )
            for group in settings.groups
        ]
        by_url = {link.group.url: link for link in self._groups}
        self._link_of_shard = [by_url[settings.group_of(shard).url] for shard in range(settings.shards)]
        self._breakers = BreakerBoard(breaker or BreakerPolicy())
        self._shards: dict[str, int] = {}  # shop -> shard, a cache: hashing costs 2 us a call
        self._shard_count_checked = 0.0
        self._shard_count_warned = False
        # redis-py connects lazily; connecting on the first run would spend that caller's deadline.
        self._publisher.submit(self._warm_publisher)

    # -- public --------------------------------------------------------------------------------
    def run(
        self,
        ep: str,
        shop_id: str | int,
        input: Any,
        *,
        timeout: float | None = None,
        fallback: Any = None,
        strict: bool = False,
    ) -> Outcome:
        """Run the script of (``ep``, ``shop_id``) on ``input``; wait at most ``timeout`` seconds."""
        call, payload, timeout = self._start(ep, shop_id, input, timeout, fallback)
        limits = self._known_limits(call)
        if isinstance(limits, Future):
            # A read of the EP from Redis (another thread's): waited for until the deadline only.
            wait_for_futures((limits,), timeout=max(call.job.deadline - time.time(), 0.0))
            limits = self._read_limits(call, limits)
        decided = (
            limits if isinstance(limits, Outcome) else self._admit(call, limits, input, payload, timeout)
        )
        if decided is not None:
            return self._finish(decided, strict)
        link = self._link_of_shard[call.shard]
        call.waiter = link.replies.expect(call.job.id)
        if not link.failing:
            self._lanes[call.shard].submit(call)  # publishes now, or joins the shard's next message
        elif not self._lanes[call.shard].try_queue(call):
            self._background(lambda: self._submit(call))  # this thread waits only on its deadline
        try:
            reply = call.waiter.wait(call.job.deadline - time.time())
        except BaseException:  # e.g. KeyboardInterrupt: the call must not hold its lane
            self._give_up(call)
            raise
        return self._finish(self._conclude(call, reply), strict)

    async def run_async(
        self,
        ep: str,
        shop_id: str | int,
        input: Any,
        *,
        timeout: float | None = None,
        fallback: Any = None,
        strict: bool = False,
    ) -> Outcome:
        """The asyncio twin of :meth:`run`: the event loop never blocks on Redis (an EP read
        on a cache miss and the publish run on the client's threads)."""
        call, payload, timeout = self._start(ep, shop_id, input, timeout, fallback)
        loop = asyncio.get_running_loop()
        limits = self._known_limits(call)
        if isinstance(limits, Future):
            if not limits.done():
                read = loop.create_future()
                limits.add_done_callback(functools.partial(_wake_loop, loop, read))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(read, max(call.job.deadline - time.time(), 0.0))
            limits = self._read_limits(call, limits)
        decided = (
            limits if isinstance(limits, Outcome) else self._admit(call, limits, input, payload, timeout)
        )
        if decided is not None:
            return self._finish(decided, strict)
        link = self._link_of_shard[call.shard]
        call.waiter = link.replies.expect(call.job.id, loop)
        # Publishing is a Redis round trip: off the event loop. Whatever happens to it reaches
        # the waiter, and the wait below ends at the deadline regardless. Joining a busy lane's
        # next message needs no I/O, so it takes no thread either.
        if not self._lanes[call.shard].try_queue(call):
            self._background(functools.partial(self._submit, call))
        try:
            reply = await call.waiter.wait_async(call.job.deadline - time.time())
        except BaseException:  # cancelled: the call must not hold its lane, nor its reply slot
            self._give_up(call)
            raise
        return self._finish(self._conclude(call, reply), strict)

    def _background(self, work: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # closed: nobody waits for what is left in the lanes
            self._publisher.submit(work)

    def _submit(self, call: _Call) -> None:
        if time.time() >= call.job.deadline:
            # Its caller has its fallback already: the publishing threads were busy (waiting on a
            # Redis that does not answer), and a job nobody waits for is not worth enqueueing.
            call.waiter.fail("the deadline passed before the job could be enqueued")
            return
        try:
            self._lanes[call.shard].submit(call)
        except Exception as exc:  # a bug, not Redis (the lane reports those): still wake the caller
            log.exception("submit_failed", job=call.job.id)
            call.waiter.fail(f"cannot enqueue: {exc!r}")

    def _warm_publisher(self) -> None:
        for link in self._groups:
            if self._closed:
                return  # a new connection to a Redis that does not answer would only delay exit
            try:
                link.redis.ping()
            except _TRANSPORT_ERRORS as exc:
                log.warning("publisher_warmup_failed", group=link.group.name, error=str(exc))
            else:
                link.answered = True
        self._check_shard_count()

    def _check_shard_count(self) -> None:
        """Log once if live workers run with another SCRIPTPOOL_SHARDS than this client: their
        queues differ, so some shops' calls would only ever time out."""
        self._shard_count_checked = time.monotonic()
        beats = []
        for link in self._groups:
            if self._closed:
                return
            try:
                beats.extend(live_workers(link.redis, self._keys))
            except _TRANSPORT_ERRORS:
                continue  # that group's calls fall back; the others are still worth checking
        disagreement = shard_count_disagreement(beats, self.settings.shards)
        if disagreement and not self._shard_count_warned:
            self._shard_count_warned = True
            log.error(
                "shard_count_mismatch",
                client_shards=self.settings.shards,
                worker_shards={str(count): names for count, names in disagreement.items()},
            )

    def _replies_reconnected(self, url: str) -> None:
        """The reply reader of the group at ``url`` connected again: what it was reading may be
        lost, so its shards' lanes stop waiting to hear about their messages."""
        for shard, link in enumerate(self._link_of_shard):
            if link.group.url == url:
                self._lanes[shard].reset()

    def batching_stats(self) -> dict[int, tuple[int, int]]:
        """Per shard: (messages published, jobs they carried) since this client started."""
        return {shard: (lane.messages, lane.jobs) for shard, lane in enumerate(self._lanes)}

    def limits(self, ep: str, *, timeout: float | None = None) -> Limits:
        """The limits scripts at ``ep`` run under, as this client knows them (cached for a few
        seconds), from the first group that answers. Raises :class:`UnknownExtensionPoint`,
        :class:`ConfigurationError` if its stored definition is unusable, :class:`ClientClosed`
        after :meth:`close`, or redis-py's error if no group's Redis answers: with ``timeout``,
        ``redis.TimeoutError`` once that many seconds pass without an answer."""
        ep = check_ep(ep)
        if self._closed:
            raise ClientClosed("the client is closed")
        started = time.monotonic()
        for n, link in enumerate(self._groups):
            try:
                known = link.limits.fresh(ep)
                if known is not None:
                    return known.limits
                future = link.read_limits(ep)
                left = None if timeout is None else max(timeout - (time.monotonic() - started), 0.0)
                wait_for_futures((future,), timeout=left)
                if not future.done():
                    raise redis.TimeoutError(
                        f"Redis of group {link.group.name} did not answer within {timeout:g} s"
                    )
                exc = future.exception()
                if isinstance(exc, ScriptpoolError):
                    raise _fresh_copy(exc)
                return future.result().limits
            except _TRANSPORT_ERRORS:
                if n == len(self._groups) - 1:
                    raise
        raise AssertionError("unreachable: the last group raises")

    def breaker_state(self, shop_id: str | int, ep: str) -> str:
        """The breaker state of (shop, EP): ``closed``, ``open`` or ``half_open``."""
        return self._breakers.get(check_shop_id(shop_id), ep).state

    def close(self) -> None:
        """Stop the reply readers, delete this client's reply lists and release connections,
        within about 0.25 s whatever Redis does. Calling it again does nothing.

        Calls still waiting get their fallback at their deadline; calls made afterwards get it at
        once (``client_closed``). Also called on leaving a ``with Client(...) as client:`` block.
        Queued publishes are dropped; one in flight ends with the connections (a Redis that does
        not answer never holds ``close`` for its socket timeout).
        """
        if self._closed:
            return
        self._closed = True
        self._publisher.shutdown(wait=False, cancel_futures=True)
        for link in self._groups:
            link.stop_reads()
            link.replies.stop()  # wakes its blocking read now
        until = time.monotonic() + _CLOSE_S
        # Deleting a reply list is one round trip on a Redis that answers; on one that does not,
        # it is given up at the bound, and the list expires by itself (Keys.REPLY_TTL_S).
        cleaners = [
            threading.Thread(target=link.delete_replies, name="scriptpool-close", daemon=True)
            for link in self._groups
        ]
        for cleaner in cleaners:
            cleaner.start()
        for cleaner in cleaners:
            cleaner.join(max(until - time.monotonic(), 0.0))
        for link in self._groups:
            link.release()
        for link in self._groups:
            link.replies.join(max(until - time.monotonic(), 0.0))
        self._clock.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- steps ---------------------------------------------------------------------------------
    def _start(
        self, ep: str, shop_id: str | int, input: Any, timeout: float | None, fallback: Any
    ) -> tuple[_Call, bytes, float]:
        """The call, checked and encoded (mistakes in it raise here), with its payload and
        timeout; nothing asks Redis yet."""
        started = time.perf_counter()
        ep = check_ep(ep)
        shop = check_shop_id(shop_id)
        if timeout is None:
            timeout = self.settings.default_deadline_ms / 1000
        if (
            not isinstance(timeout, (int, float))
            or isinstance(timeout, bool)
            or not 0 < timeout <= MAX_TIMEOUT_S
        ):
            raise InvalidArgument(
                f"timeout must be a number of seconds in (0, {MAX_TIMEOUT_S}], got {timeout!r}"
            )
        validated = time.perf_counter()
        payload = encode_input(input)
        serialized = time.perf_counter()
        now = time.time()
        job = Job(os.urandom(16).hex(), ep, shop, payload, deadline=now + timeout, enqueued_at=now)
        call = _Call(job, self._shard_of(shop), self._breakers.get(shop, ep), fallback, started)
        call.validated, call.serialized = validated, serialized
        return call, payload, timeout

    def _known_limits(self, call: _Call) -> _EpLimits | Outcome | Future[_EpLimits]:
        """The call's EP limits if known without waiting on Redis, its outcome if it ends here
        (closed client, failing group), or the read from Redis to wait for (until the deadline)."""
        if self._closed:
            return call.fallback_outcome(ClientClosed, "the client is closed: run() after close()")
        link = self._link_of_shard[call.shard]
        ep = call.job.ep
        if link.failing:
            # Do not wait on that Redis here: the limits last read serve, or the call falls back.
            cached = link.limits.peek(ep)
            if cached is None:
                link.read_limits(ep)  # once it answers, calls go out again
                call.breaker.failure()
                return call.fallback_outcome(
                    BrokerUnavailable, f"Redis of group {link.group.name} does not answer"
                )
            return cached
        known = link.limits.fresh(ep)  # raises UnknownExtensionPoint while that is known
        if known is not None:
            return known
        return link.read_limits(ep)

    def _read_limits(self, call: _Call, read: Future[_EpLimits]) -> _EpLimits | Outcome:
        """What the EP read means for the call, once it ended or the call's deadline passed."""
        link = self._link_of_shard[call.shard]
        if not read.done():
            call.breaker.failure()
            return call.fallback_outcome(
                BrokerUnavailable,
                f"Redis of group {link.group.name} did not answer before the deadline "
                f"(reading extension point {call.job.ep!r})",
            )
        exc = read.exception()
        if exc is None:
            return read.result()
        if isinstance(exc, ConfigurationError):
            # The EP's stored definition cannot be used (anyone who can write to Redis may have
            # put anything there): a runtime failure, named, like the worker's answer to it.
            return call.error_outcome(ConfigurationError, exc.message)
        if isinstance(exc, ClientClosed):
            return call.fallback_outcome(ClientClosed, "the client is closed: run() after close()")
        if isinstance(exc, ScriptpoolError):
            raise _fresh_copy(exc)  # UnknownExtensionPoint: a mistake in the call
        call.breaker.failure()
        if isinstance(exc, _TRANSPORT_ERRORS):
            return call.fallback_outcome(BrokerUnavailable, f"cannot reach Redis: {exc}")
        return call.fallback_outcome(
            BrokerUnavailable, f"cannot read extension point {call.job.ep!r}: {exc!r}"
        )

    def _admit(
        self, call: _Call, limits: _EpLimits, input: Any, payload: bytes, timeout: float
    ) -> Outcome | None:
        """None if the call may go out; else its outcome (an open breaker). An input over the
        EP's limit raises."""
        check_input_size(payload, limits.for_input(input, payload))
        if not call.breaker.allow(timeout):
            shop, ep = call.job.shop_id, call.job.ep
            return call.fallback_outcome(CircuitOpen, f"circuit for {shop}/{ep} is open")
        return None

    def _publish(self, calls: list[Any], announce: bool) -> None:
        """One task message carrying ``calls`` (one or more jobs for the same shard); with
        ``announce`` the worker says when it takes it (``scriptpool.producer._batching``)."""
        first = calls[0].job
        argsrepr = f"[job {first.ep}/{first.shop_id}]" if len(calls) == 1 else f"[{len(calls)} jobs]"
        link = self._link_of_shard[calls[0].shard]
        if self._closed:
            raise redis.ConnectionError("the client is closed")
        # Wait for Redis's acknowledgement no longer than the latest caller of the message waits.
        remaining = max(call.job.deadline for call in calls) - time.time()
        try:
            link.tasks.publish(
                first.id,
                [call.job.to_wire() for call in calls],
                {"announce": True} if announce else {},
                queue=self._keys.queue(calls[0].shard),
                reply_to=link.replies.reply_key,
                argsrepr=argsrepr,
                timeout=min(_PUBLISH_TIMEOUT_S, max(remaining, _PUBLISH_MIN_S)),
            )
        except _TRANSPORT_ERRORS:
            link.failing = True
            raise
        link.failing, link.answered = False, True
        now = time.perf_counter()
        for call in calls:
            call.enqueued = now

    def _publish_failed(self, calls: list[Any], exc: Exception) -> None:
        for call in calls:
            call.waiter.fail(f"cannot enqueue: {exc}")

    def _give_up(self, call: _Call) -> None:
        """The caller stops waiting without a reply: nobody reads one for it, and its call leaves
        the lane's count (which may let the shard's next message go)."""
        self._link_of_shard[call.shard].replies.forget(call.job.id)
        self._lanes[call.shard].abandon(call)

    def _conclude(self, call: _Call, raw: dict[str, Any] | None) -> Outcome:
        if raw is None:
            self._give_up(call)
            call.breaker.failure()
            failure = call.waiter.failure
            if failure is not None:
                return call.fallback_outcome(BrokerUnavailable, failure)
            if time.monotonic() - self._shard_count_checked > _SHARD_COUNT_RECHECK_S:
                self._shard_count_checked = time.monotonic()
                self._background(self._check_shard_count)  # off the caller's path
            return call.fallback_outcome(DeadlineExceeded, "no reply before the deadline")
        try:
            reply = Reply.from_wire(raw)
        except ValueError as exc:
            # The dispatcher hands over any map that names this job: whatever else it holds is
            # untrusted, and this caller hears so now rather than at its deadline.
            log.warning("reply_invalid", job=call.job.id, problem=str(exc)[:200])
            call.breaker.failure()
            return call.error_outcome(InvalidReply, f"the reply cannot be read: {exc}")
        total_ms = (time.perf_counter() - call.started) * 1000
        validate_ms, serialize_ms, enqueue_ms = call.client_stages_ms()
        # enqueued_at is stamped before the publish, so the publish itself is not queue wait. A
        # batched call's publish can return after the worker already took the message (the
        # publishing thread was descheduled), so enqueue ends at the worker's receipt at the latest.
        until_received_ms = max(0.0, (reply.received_at - call.job.enqueued_at) * 1000)
        enqueue_ms = min(enqueue_ms, until_received_ms)
        queue_wait_ms = until_received_ms - enqueue_ms
        execute_ms = (reply.finished_at - reply.received_at) * 1000
        accounted = validate_ms + serialize_ms + enqueue_ms + queue_wait_ms + execute_ms
        timings = Timings(
            validate_ms=round(validate_ms, 4),
            serialize_ms=round(serialize_ms, 4),
            enqueue_ms=round(enqueue_ms, 4),
            queue_wait_ms=round(queue_wait_ms, 4),
            execute_ms=round(execute_ms, 4),
            result_ms=round(max(0.0, total_ms - accounted), 4),
            total_ms=round(total_ms, 4),
        )
        where = (timings, reply.shard, reply.worker, call.job.id)
        execution = reply.execution
        if execution is None:
            error = reply.error or ErrorInfo(WorkerFailed.code, "the worker sent neither result nor error")
            call.breaker.failure()
            return Outcome(ERROR, call.fallback, error.code, error, None, *where)
        if execution.ok:
            call.breaker.success()
            return Outcome(OK, execution.output, None, None, execution.report, *where, execution.parts)
        error = execution.error or ErrorInfo(ScriptpoolError.code, "the script failed without an error")
        if error_class_for(error.code).trips_breaker:
            call.breaker.failure()
        else:
            call.breaker.success()
        return Outcome(ERROR, call.fallback, error.code, error, execution.report, *where, execution.parts)

    def _finish(self, outcome: Outcome, strict: bool) -> Outcome:
        return outcome.raise_for_status() if strict else outcome

    def _shard_of(self, shop: str) -> int:
        shard = self._shards.get(shop)
        if shard is None:
            if len(self._shards) >= _SHARD_CACHE:
                self._shards.clear()
            shard = self._shards[shop] = shard_for(shop, self.settings.shards)
        return shard


@dataclass(frozen=True, slots=True)
class _EpLimits:
    """What the client knows of an EP: its limits, and its scale rules."""

    limits: Limits
    scale: dict[str, float]

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


class _Call:
    """One call in flight."""

    __slots__ = (
        "breaker", "enqueued", "fallback", "job", "serialized", "shard", "started", "validated", "waiter",
    )  # fmt: skip
    waiter: Waiter

    def __init__(self, job: Job, shard: int, breaker: CircuitBreaker, fallback: Any, started: float) -> None:
        self.job = job
        self.shard = shard
        self.breaker = breaker
        self.fallback = fallback
        self.started = self.validated = self.serialized = started
        self.enqueued: float | None = None

    def client_stages_ms(self) -> tuple[float, float, float]:
        """(validate, serialize, enqueue) in ms; enqueue is 0 when nothing was published."""
        enqueue = (self.enqueued - self.serialized) if self.enqueued is not None else 0.0
        return (
            (self.validated - self.started) * 1000,
            (self.serialized - self.validated) * 1000,
            enqueue * 1000,
        )

    def fallback_outcome(self, error: type[ScriptpoolError], message: str) -> Outcome:
        return self._client_side_outcome(FALLBACK, error, message)

    def error_outcome(self, error: type[ScriptpoolError], message: str) -> Outcome:
        """An ``error`` outcome decided by the client (the reply came but cannot be used)."""
        return self._client_side_outcome(ERROR, error, message)

    def _client_side_outcome(self, status: str, error: type[ScriptpoolError], message: str) -> Outcome:
        total_ms = round((time.perf_counter() - self.started) * 1000, 4)
        validate_ms, serialize_ms, enqueue_ms = (round(v, 4) for v in self.client_stages_ms())
        return Outcome(
            status,
            self.fallback,
            error.code,
            ErrorInfo(error.code, message),
            None,
            Timings(validate_ms, serialize_ms, enqueue_ms, total_ms=total_ms),
            self.shard,
            None,
            self.job.id,
        )


def _wake_loop(loop: asyncio.AbstractEventLoop, waiting: asyncio.Future[None], _done: object) -> None:
    """(Any thread.) A read ended: wake the coroutine awaiting ``waiting`` on ``loop``."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits
        loop.call_soon_threadsafe(_set_done, waiting)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fresh_copy(exc: ScriptpoolError) -> ScriptpoolError:
    """``exc`` anew: one read's error reaches several callers, each raising its own."""
    return type(exc)(exc.message, **exc.detail)


def _shown(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
