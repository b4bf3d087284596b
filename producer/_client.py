"""The host API: enqueue a job for the shop's shard and wait for it, degrading to a fallback.

``run`` and ``run_async`` share one body, :meth:`Client._call`: a generator that checks and plans
the call, yields what it has to wait for (the read of its EP's definition, on a cache miss, then
its reply), each until the call's deadline, and returns its outcome. The two wrappers differ only
in how they wait: ``run`` blocks its thread; ``run_async`` awaits, and the event loop never blocks
on Redis (an EP read and the publish run on the client's threads).

Long on purpose (past 450 lines): the call body, its two drivers and the client's lifecycle are
one flow read top to bottom; the parts that stand alone are beside it already (``_calls``: the
call and its outcome, ``_links``: the groups' connections, ``_queries``: input queries).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from typing import Any

import redis

from scriptpool.config import (
    Limits,
    Settings,
    check_ep,
    check_shop_id,
    get_logger,
    shard_for,
)
from scriptpool.config.errors import (
    BrokerUnavailable,
    ClientClosed,
    DeadlineExceeded,
    InvalidArgument,
    InvalidInput,
    ScriptpoolError,
)
from scriptpool.config.wire import MAX_SESSION_CHARS, Job, encode_input, valid_session
from scriptpool.producer._batching import BatchPolicy, Lane
from scriptpool.producer._breaker import BreakerBoard, BreakerPolicy
from scriptpool.producer._calls import Call, admit, fresh_copy, read_outcome, reply_outcome
from scriptpool.producer._clock import LaneClock
from scriptpool.producer._group import TRANSPORT_ERRORS, EpLimits
from scriptpool.producer._links import Links, ShardOutlet
from scriptpool.producer._outcome import Outcome
from scriptpool.producer._queries import BoundQueries, prepare, prepare_async
from scriptpool.producer._replies import Waiter
from scriptpool.producer._tracing import abandon_call, call_tracing

log = get_logger("client")

# After a timeout, the workers' shard count is compared with ours again at most this often.
_SHARD_COUNT_RECHECK_S = 30.0
# Callers wait in checkout paths; anything longer is a mistake (inf would overflow the wait).
MAX_TIMEOUT_S = 600
_SHARD_CACHE = 100_000


def _json_but_loaders(value: Any) -> bool:
    """Whether ``value`` is JSON once its loaders (callables, which only an EP with an input
    schema takes) are left out: what may wait for its EP's definition rather than be refused."""
    try:
        json.dumps(value, allow_nan=False, default=lambda o: None if callable(o) else _not_json(o))
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _not_json(value: Any) -> None:
    raise TypeError(f"{type(value).__name__} is not JSON")


class _Projecting:
    """A call's input to project through its EP's input queries: the host's loaders run in the
    caller's own style (awaited on ``run_async``), so the call yields this to its wrapper."""

    __slots__ = ("bound", "input", "payload", "value")

    def __init__(self, bound: BoundQueries, input: Any) -> None:
        self.bound = bound
        self.input = input
        self.value: Any = None
        self.payload = b""

    def run(self) -> None:
        self.value, self.payload = prepare(self.bound, self.input)

    async def run_async(self) -> None:
        self.value, self.payload = await prepare_async(self.bound, self.input)


# What a call waits for, and until when (its deadline, wall clock): the read of its EP's
# definition (or of its input queries) from Redis, its input's projection, or its reply. The
# wrapper resumes the call with the reply (None for the others, or when no reply came), or
# throws into it what interrupted the wait.
_Wait = tuple[Future[EpLimits] | Future[BoundQueries] | _Projecting | Waiter, float]
_Steps = Generator[_Wait, dict[str, Any] | None, Outcome]


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
        self.client_id = os.urandom(16).hex()
        self._publisher = ThreadPoolExecutor(max_workers=8, thread_name_prefix="scriptpool-publish")
        self.batching = batching or BatchPolicy()
        self._links = Links(settings, self.client_id)
        self._groups = self._links.groups
        self._link_of_shard = self._links.of_shard
        self._clock = LaneClock()  # frees a lane's slot at its message's deadline at the latest
        self._lanes: list[Lane[Call]] = [
            Lane(self.batching, ShardOutlet(self._links, shard, self._publisher), self._clock)
            for shard in range(settings.shards)
        ]
        for link, lane in zip(self._link_of_shard, self._lanes, strict=True):
            link.lanes.append(lane)
        self._breakers = BreakerBoard(breaker or BreakerPolicy())
        self._shards: dict[str, int] = {}  # shop -> shard, a cache: hashing costs 2 us a call
        # EPs last read with an input schema: a call's input waits for their queries, unencoded.
        self._queried: set[str] = set()
        # Traces (README "Traces"): None unless the host configured a tracer provider before.
        self._tracing = call_tracing()
        self._publisher.submit(self._links.warm)

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
        session: str | None = None,
    ) -> Outcome:
        """Run the script of (``ep``, ``shop_id``) on ``input``; wait at most ``timeout`` seconds.

        ``session`` is the buyer's session token (1 to 256 printable characters): scripts read
        and write that session's data (the SESSION scope) within this shop."""
        steps = self._call(ep, shop_id, input, timeout, fallback, strict, None, session)
        try:
            waiting, deadline = next(steps)
            while True:
                try:
                    if isinstance(waiting, Waiter):
                        reply = waiting.wait(deadline - time.time())
                    elif isinstance(waiting, _Projecting):
                        waiting.run()
                        reply = None
                    else:
                        read: Future[Any] = waiting
                        wait_for_futures((read,), timeout=max(deadline - time.time(), 0.0))
                        reply = None
                except BaseException as exc:  # e.g. KeyboardInterrupt: the call lets go of its lane
                    waiting, deadline = steps.throw(exc)
                else:
                    waiting, deadline = steps.send(reply)
        except StopIteration as done:
            outcome: Outcome = done.value
            return outcome

    async def run_async(
        self,
        ep: str,
        shop_id: str | int,
        input: Any,
        *,
        timeout: float | None = None,
        fallback: Any = None,
        strict: bool = False,
        session: str | None = None,
    ) -> Outcome:
        """The asyncio twin of :meth:`run`: the event loop never blocks on Redis (an EP read
        on a cache miss and the publish run on the client's threads)."""
        loop = asyncio.get_running_loop()
        steps = self._call(ep, shop_id, input, timeout, fallback, strict, loop, session)
        try:
            waiting, deadline = next(steps)
            while True:
                try:
                    if isinstance(waiting, Waiter):
                        reply = await waiting.wait_async(deadline - time.time())
                    elif isinstance(waiting, _Projecting):
                        await waiting.run_async()
                        reply = None
                    else:
                        await _read_ended(loop, waiting, deadline)
                        reply = None
                except BaseException as exc:  # cancelled: the call lets go of its lane and reply slot
                    waiting, deadline = steps.throw(exc)
                else:
                    waiting, deadline = steps.send(reply)
        except StopIteration as done:
            outcome: Outcome = done.value
            return outcome

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
        if self._links.closed:
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
                    raise fresh_copy(exc)
                return future.result().limits
            except TRANSPORT_ERRORS:
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
        if self._links.closed:
            return
        self._links.closed = True
        self._publisher.shutdown(wait=False, cancel_futures=True)
        self._links.close()
        self._clock.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one call ------------------------------------------------------------------------------
    def _call(
        self,
        ep: str,
        shop_id: str | int,
        input: Any,
        timeout: float | None,
        fallback: Any,
        strict: bool,
        loop: asyncio.AbstractEventLoop | None,
        session: str | None = None,
    ) -> _Steps:
        """One call in either style (``loop``: the caller's event loop, None for a thread): it
        checks and plans the call, yields each wait with the call's deadline (``_Wait``) and
        returns the outcome. Mistakes in the call raise, as ``strict`` outcomes do."""
        call, payload, timeout = self._start(ep, shop_id, input, timeout, fallback, session)
        try:
            limits = self._known_limits(call)
            if isinstance(limits, Future):
                if not limits.done():
                    yield limits, call.job.deadline  # another thread's read of the EP from Redis
                limits = read_outcome(call, limits, self._link_of_shard[call.shard].group.name)
            if not isinstance(limits, Outcome) and (limits.input_graphql is not None or payload is None):
                # An EP with an input schema (or one this client took for one): its input goes
                # through the queries bound at (EP, shop).
                bound = yield from self._bound_queries(call, limits, payload)
                if isinstance(bound, Outcome):
                    return self._finish(bound, strict)
                if bound is not None:
                    projecting = _Projecting(bound, input)
                    yield projecting, call.job.deadline  # the host's loaders, in the caller's style
                    input, payload = projecting.value, projecting.payload
                    call.job = dataclasses.replace(call.job, input=payload, queries=bound.digests)
                    call.serialized = time.perf_counter()
                elif payload is None:  # the EP has no schema (any more): its input as it came
                    payload = encode_input(input)
                    call.job = dataclasses.replace(call.job, input=payload)
                    call.serialized = time.perf_counter()
            if isinstance(limits, Outcome):
                decided: Outcome | None = limits
            else:
                assert payload is not None  # encoded above, or by _start
                decided = admit(call, limits, input, payload, timeout)
            if decided is not None:
                return self._finish(decided, strict)
            link = self._link_of_shard[call.shard]
            call.waiter = link.replies.expect(call.job.id, loop)
            lane = self._lanes[call.shard]
            if loop is None and not link.failing:
                lane.submit(call)  # publishes now, or joins the shard's next message
            elif not lane.try_queue(call):
                # Publishing is a Redis round trip: never on an event loop, nor in a thread whose
                # group's Redis is failing (that caller waits only on its deadline). Whatever happens
                # to it reaches the waiter. Joining a busy lane's next message needs no I/O.
                self._background(functools.partial(self._submit, call))
            try:
                reply = yield call.waiter, call.job.deadline
            except BaseException:  # interrupted or cancelled: the call must not hold its lane
                self._give_up(call)
                raise
            return self._finish(self._conclude(call, reply), strict)
        except BaseException as exc:
            if call.span is not None:  # a traced call that raised instead of ending in an outcome
                abandon_call(call, exc)
            raise

    def _bound_queries(
        self, call: Call, limits: EpLimits, payload: bytes | None
    ) -> Generator[_Wait, dict[str, Any] | None, BoundQueries | Outcome | None]:
        """The queries bound at the call's (EP, shop) if its EP has an input schema (waiting on
        their read from Redis until the deadline), the call's outcome if that read failed, or
        None for an EP without a schema (then the EP leaves the client's set of queried EPs)."""
        ep = call.job.ep
        if limits.input_graphql is None:
            self._queried.discard(ep)
            return None
        self._queried.add(ep)
        link = self._link_of_shard[call.shard]
        bound = link.queries.fresh(ep, call.job.shop_id)
        if bound is not None:
            return bound
        read = link.queries.read(ep, call.job.shop_id, limits.input_graphql)
        if not read.done():
            yield read, call.job.deadline  # another thread's read of the binding from Redis
        what = f"the input queries bound at {ep}/{call.job.shop_id}"
        return read_outcome(call, read, link.group.name, what=what)

    def input_query(
        self, ep: str, shop_id: str | int, *, timeout: float | None = None
    ) -> dict[str, Any] | None:
        """What the scripts bound at (``ep``, ``shop_id``) read of the input: the union of their
        input queries' selections as nested dicts (a response key maps to None for a leaf or to
        its own selection; a field with arguments appears as ``name({"arg":...})``; fields of an
        abstract type's members under ``"... on Type"``), for a host that loads by query itself.
        None when the EP has no input schema or some bound app has no query (it reads the whole
        input). Kept coherent with deploys as :meth:`run` keeps it. Raises as :meth:`limits`
        does (``redis.TimeoutError`` after ``timeout`` seconds without an answer)."""
        ep = check_ep(ep)
        shop = check_shop_id(shop_id)
        if self._links.closed:
            raise ClientClosed("the client is closed")
        link = self._link_of_shard[self._shard_of(shop)]
        started = time.monotonic()

        def left() -> float | None:
            return None if timeout is None else max(timeout - (time.monotonic() - started), 0.0)

        limits = link.limits.fresh(ep)
        if limits is None:
            limits = _wait_read(link.read_limits(ep), left(), link.group.name, timeout)
        if limits.input_graphql is None:
            return None
        bound = link.queries.fresh(ep, shop)
        if bound is None:
            bound = _wait_read(
                link.queries.read(ep, shop, limits.input_graphql), left(), link.group.name, timeout
            )
        return bound.selection()

    def _start(
        self,
        ep: str,
        shop_id: str | int,
        input: Any,
        timeout: float | None,
        fallback: Any,
        session: str | None = None,
    ) -> tuple[Call, bytes | None, float]:
        """The call, checked and encoded (mistakes in it raise here), with its payload and
        timeout; nothing asks Redis yet. The payload is None when the input waits for its EP's
        input queries: the EP is known to have an input schema, or the input holds what only
        such an EP takes (loaders) and the EP is not known yet."""
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
        if session is not None and not (type(session) is str and valid_session(session)):
            raise InvalidArgument(
                f"session must be a string of 1 to {MAX_SESSION_CHARS} printable characters, "
                f"got {_shown(session)}",
                kind="session",
            )
        validated = time.perf_counter()
        payload: bytes | None = None
        if ep not in self._queried:
            try:
                payload = encode_input(input)
            except InvalidInput:
                known = self._link_of_shard[self._shard_of(shop)].limits.peek(ep)
                if known is not None and known.input_graphql is None:
                    raise  # a known EP without an input schema: the input is not JSON
                if not _json_but_loaders(input):
                    raise  # not JSON whatever the EP: refused before anything asks Redis
        serialized = time.perf_counter()
        now = time.time()
        job = Job(
            os.urandom(16).hex(),
            ep,
            shop,
            payload or b"",
            deadline=now + timeout,
            enqueued_at=now,
            session=session,
        )
        call = Call(job, self._shard_of(shop), self._breakers.get(shop, ep), fallback, started)
        call.validated, call.serialized = validated, serialized
        if self._tracing is not None:
            self._tracing.start(call, self._link_of_shard[call.shard].group.name)
        return call, payload, timeout

    def _known_limits(self, call: Call) -> EpLimits | Outcome | Future[EpLimits]:
        """The call's EP limits if known without waiting on Redis, its outcome if it ends here
        (closed client, failing group), or the read from Redis to wait for (until the deadline)."""
        if self._links.closed:
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

    def _background(self, work: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # closed: nobody waits for what is left in the lanes
            self._publisher.submit(work)

    def _submit(self, call: Call) -> None:
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

    def _give_up(self, call: Call) -> None:
        """The caller stops waiting without a reply: nobody reads one for it, and its call leaves
        the lane's count (which may let the shard's next message go)."""
        self._link_of_shard[call.shard].replies.forget(call.job.id)
        self._lanes[call.shard].abandon(call)

    def _conclude(self, call: Call, raw: dict[str, Any] | None) -> Outcome:
        """The outcome of a call that waited for its reply: ``raw``, or None if none came."""
        if raw is not None:
            return reply_outcome(call, raw)
        self._give_up(call)
        call.breaker.failure()
        failure = call.waiter.failure
        if failure is not None:
            return call.fallback_outcome(BrokerUnavailable, failure)
        if time.monotonic() - self._links.shard_count_checked > _SHARD_COUNT_RECHECK_S:
            self._links.shard_count_checked = time.monotonic()
            self._background(self._check_shard_count)  # off the caller's path
        return call.fallback_outcome(DeadlineExceeded, "no reply before the deadline")

    def _check_shard_count(self) -> None:
        """Log once if live workers run with another SCRIPTPOOL_SHARDS than this client."""
        self._links.check_shard_count()

    def _finish(self, outcome: Outcome, strict: bool) -> Outcome:
        return outcome.raise_for_status() if strict else outcome

    def _shard_of(self, shop: str) -> int:
        shard = self._shards.get(shop)
        if shard is None:
            if len(self._shards) >= _SHARD_CACHE:
                self._shards.clear()
            shard = self._shards[shop] = shard_for(shop, self.settings.shards)
        return shard


def _wait_read(read: Future[Any], timeout: float | None, group: str, asked: float | None) -> Any:
    """The result of a read on a group's reader threads, waited for up to ``timeout`` seconds:
    what it raised is raised (a fresh copy of a named error), ``redis.TimeoutError`` if it
    did not end in time."""
    wait_for_futures((read,), timeout=timeout)
    if not read.done():
        raise redis.TimeoutError(f"Redis of group {group} did not answer within {asked:g} s")
    exc = read.exception()
    if isinstance(exc, ScriptpoolError):
        raise fresh_copy(exc)
    return read.result()


async def _read_ended(loop: asyncio.AbstractEventLoop, read: Future[Any], deadline: float) -> None:
    """Await the end of ``read`` (a thread's) until ``deadline``, the loop free meanwhile."""
    ended = loop.create_future()
    read.add_done_callback(functools.partial(_wake_loop, loop, ended))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ended, max(deadline - time.time(), 0.0))


def _wake_loop(loop: asyncio.AbstractEventLoop, waiting: asyncio.Future[None], _done: object) -> None:
    """(Any thread.) A read ended: wake the coroutine awaiting ``waiting`` on ``loop``."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits
        loop.call_soon_threadsafe(_set_done, waiting)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _shown(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
