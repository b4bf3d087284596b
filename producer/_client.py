"""The host API: enqueue a job for the shop's shard and wait for it, degrading to a fallback."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import structlog
from kombu.exceptions import KombuError

from config import TASK_NAME, Job, Limits, Settings, check_ep, check_shop_id, encode_input, shard_for
from config.errors import InputTooLarge, InvalidArgument, UnknownExtensionPoint
from producer._breaker import BreakerBoard, BreakerPolicy, CircuitBreaker
from producer._outcome import ERROR, FALLBACK, OK, Outcome, Timings
from producer._replies import ReplyDispatcher
from registry._extension_points import ExtensionPoint
from workers._app import create_app
from workers._report import ErrorInfo, ExecutionReport

log = structlog.get_logger("scriptpool.client")

# Failures that say the script or the pool is unhealthy, and so count against the breaker.
# Caller mistakes (bad input, unknown script) do not.
_BREAKER_FAILURES = frozenset({
    "instruction_limit_exceeded", "memory_limit_exceeded", "stack_overflow", "wall_clock_exceeded",
    "runtime_error", "invalid_output", "output_too_large", "worker_error", "timeout",
    "broker_unavailable",
})  # fmt: skip
_TRANSPORT_ERRORS = (redis.RedisError, KombuError, OSError)
_EP_CACHE_S = 5.0


class Client:
    """Runs scripts on the pool. Thread-safe and asyncio-friendly; keep one per process.

    ``run``/``run_async`` never raise for runtime failures: they return an :class:`Outcome`
    whose ``output`` is the fallback. Mistakes in the call itself (bad shop id, unknown EP,
    input that is not JSON or too large, a non-positive timeout) raise before anything is enqueued.
    """

    def __init__(self, settings: Settings, *, breaker: BreakerPolicy | None = None) -> None:
        self.settings = settings
        self.client_id = uuid.uuid4().hex
        self._keys = settings.keys
        self._app = create_app(settings)
        self._redis = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=0.25, socket_timeout=1.0
        )
        self._replies = ReplyDispatcher(settings.redis_url, self._keys.replies(self.client_id))
        self._breakers = BreakerBoard(breaker or BreakerPolicy())
        self._eps: dict[str, tuple[ExtensionPoint | None, float]] = {}
        self._publisher = ThreadPoolExecutor(max_workers=8, thread_name_prefix="scriptpool-publish")
        # kombu connects lazily; connecting on the first run would spend that caller's deadline.
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
        call = self._prepare(ep, shop_id, input, timeout, fallback)
        if isinstance(call, Outcome):
            return self._finish(call, strict)
        waiter = self._replies.expect(call.job.id)
        failed = self._publish(call)
        if failed is not None:
            return self._finish(failed, strict)
        reply = waiter.wait(call.job.deadline - time.time())
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
        """The asyncio twin of :meth:`run`: the event loop never blocks on Redis."""
        call = self._prepare(ep, shop_id, input, timeout, fallback)
        if isinstance(call, Outcome):
            return self._finish(call, strict)
        loop = asyncio.get_running_loop()
        waiter = self._replies.expect(call.job.id, loop)
        remaining = call.job.deadline - time.time()
        try:
            failed = await asyncio.wait_for(
                loop.run_in_executor(self._publisher, self._publish, call), max(remaining, 0.0)
            )
        except TimeoutError:
            failed = call.fallback_outcome("timeout", "enqueue did not finish before the deadline")
            call.breaker.failure()
            self._replies.forget(call.job.id)
        if failed is not None:
            return self._finish(failed, strict)
        reply = await waiter.wait_async(call.job.deadline - time.time())
        return self._finish(self._conclude(call, reply), strict)

    def _warm_publisher(self) -> None:
        try:
            with self._app.producer_or_acquire() as producer:
                producer.connection.default_channel  # noqa: B018 - connecting is the point
        except _TRANSPORT_ERRORS as exc:
            log.warning("publisher_warmup_failed", error=str(exc))

    def breaker_state(self, shop_id: str | int, ep: str) -> str:
        """The breaker state of (shop, EP): ``closed``, ``open`` or ``half_open``."""
        return self._breakers.get(check_shop_id(shop_id), ep).state

    def close(self) -> None:
        """Stop the reply dispatcher and release connections."""
        self._replies.close()
        self._publisher.shutdown(wait=False)
        self._redis.close()
        self._app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- steps ---------------------------------------------------------------------------------
    def _prepare(
        self, ep: str, shop_id: str | int, input: Any, timeout: float | None, fallback: Any
    ) -> _Call | Outcome:
        started = time.perf_counter()
        ep = check_ep(ep)
        shop = check_shop_id(shop_id)
        if timeout is None:
            timeout = self.settings.default_deadline_ms / 1000
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
        validated = time.perf_counter()
        payload = encode_input(input)
        serialized = time.perf_counter()
        now = time.time()
        job = Job(uuid.uuid4().hex, ep, shop, payload, deadline=now + timeout, enqueued_at=now)
        breaker = self._breakers.get(shop, ep)
        call = _Call(job, shard_for(shop, self.settings.shards), breaker, fallback, started)
        call.validated, call.serialized = validated, serialized
        try:
            limits = self._limits(ep)
        except _TRANSPORT_ERRORS as exc:
            breaker.failure()
            return call.fallback_outcome("broker_unavailable", f"cannot reach Redis: {exc}")
        if len(payload) > limits.input_bytes:
            raise InputTooLarge(
                f"input is {len(payload)} bytes; the limit is {limits.input_bytes}",
                size=len(payload),
                limit=limits.input_bytes,
            )
        if not breaker.allow():
            return call.fallback_outcome("circuit_open", f"circuit for {shop}/{ep} is open")
        return call

    def _publish(self, call: _Call) -> Outcome | None:
        try:
            self._app.send_task(
                TASK_NAME,
                args=[call.job.to_wire()],
                queue=self._keys.queue(call.shard),
                task_id=call.job.id,
                reply_to=self._replies.reply_key,
                retry=False,
            )
        except _TRANSPORT_ERRORS as exc:
            self._replies.forget(call.job.id)
            call.breaker.failure()
            return call.fallback_outcome("broker_unavailable", f"cannot enqueue: {exc}")
        call.enqueued = time.perf_counter()
        return None

    def _conclude(self, call: _Call, reply: dict[str, Any] | None) -> Outcome:
        if reply is None:
            self._replies.forget(call.job.id)
            call.breaker.failure()
            return call.fallback_outcome("timeout", "no reply before the deadline")
        total_ms = (time.perf_counter() - call.started) * 1000
        validate_ms, serialize_ms, enqueue_ms = call.client_stages_ms()
        # enqueued_at is stamped before the publish, so the publish itself is not queue wait.
        queue_wait_ms = max(0.0, (reply["received_at"] - call.job.enqueued_at) * 1000 - enqueue_ms)
        execute_ms = (reply["finished_at"] - reply["received_at"]) * 1000
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
        common = {
            "timings": timings,
            "shard": reply["shard"],
            "worker": reply["worker"],
            "job_id": call.job.id,
        }
        execution = reply.get("execution")
        if execution is None:
            error = ErrorInfo(**reply["error"])
            call.breaker.failure()
            return Outcome(ERROR, call.fallback, error.code, error, None, **common)
        report = ExecutionReport(**execution["report"])
        if execution["ok"]:
            call.breaker.success()
            return Outcome(OK, execution["output"], None, None, report, **common)
        error = ErrorInfo(**execution["error"])
        if error.code in _BREAKER_FAILURES:
            call.breaker.failure()
        else:
            call.breaker.success()
        return Outcome(ERROR, call.fallback, error.code, error, report, **common)

    def _finish(self, outcome: Outcome, strict: bool) -> Outcome:
        return outcome.raise_for_status() if strict else outcome

    def _limits(self, ep: str) -> Limits:
        now = time.monotonic()
        cached = self._eps.get(ep)
        if cached is None or cached[1] <= now:
            raw = self._redis.get(self._keys.extension_point(ep))
            definition = ExtensionPoint.from_json(raw) if raw is not None else None
            # An unknown EP is re-checked after a second, so a newly defined one is seen soon.
            self._eps[ep] = cached = (definition, now + (_EP_CACHE_S if definition else 1.0))
        if cached[0] is None:
            raise UnknownExtensionPoint(f"extension point {ep!r} is not defined", ep=ep)
        return cached[0].limits(self.settings.limits)


class _Call:
    """One call in flight."""

    __slots__ = ("breaker", "enqueued", "fallback", "job", "serialized", "shard", "started", "validated")

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

    def fallback_outcome(self, code: str, message: str) -> Outcome:
        total_ms = round((time.perf_counter() - self.started) * 1000, 4)
        validate_ms, serialize_ms, enqueue_ms = (round(v, 4) for v in self.client_stages_ms())
        return Outcome(
            FALLBACK,
            self.fallback,
            code,
            ErrorInfo(code, message),
            None,
            Timings(validate_ms, serialize_ms, enqueue_ms, total_ms=total_ms),
            self.shard,
            None,
            self.job.id,
        )


__all__ = ["Client"]
