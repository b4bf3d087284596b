"""One call in flight, and the outcomes it can end with: decided by the client, or read from a reply."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any, TypeVar

from scriptpool.config import check_input_size, get_logger
from scriptpool.config.errors import (
    BrokerUnavailable,
    CircuitOpen,
    ClientClosed,
    ConfigurationError,
    InvalidReply,
    QuotaExceeded,
    ScriptpoolError,
    WorkerFailed,
    error_class_for,
)
from scriptpool.config.wire import ErrorInfo, Job, Reply
from scriptpool.producer._breaker import CircuitBreaker
from scriptpool.producer._group import TRANSPORT_ERRORS, EpLimits
from scriptpool.producer._outcome import ERROR, FALLBACK, OK, Outcome, Timings
from scriptpool.producer._replies import Waiter
from scriptpool.producer._tracing import end_call

log = get_logger("client")
T = TypeVar("T")


class Call:
    """One call in flight: its job, where it goes, its breaker and fallback, and when each of
    the client's stages ended (``time.perf_counter``)."""

    __slots__ = (
        "breaker", "enqueued", "fallback", "job", "serialized", "shard", "span", "started", "validated",
        "waiter",
    )  # fmt: skip
    waiter: Waiter

    def __init__(self, job: Job, shard: int, breaker: CircuitBreaker, fallback: Any, started: float) -> None:
        self.job = job
        self.shard = shard
        self.breaker = breaker
        self.fallback = fallback
        self.started = self.validated = self.serialized = started
        self.enqueued: float | None = None
        # The call's span (``scriptpool.producer._tracing``), when the host traces: None otherwise.
        self.span: Any = None

    def client_stages_ms(self) -> tuple[float, float, float]:
        """(validate, serialize, enqueue) in ms; enqueue is 0 when nothing was published."""
        enqueue = (self.enqueued - self.serialized) if self.enqueued is not None else 0.0
        return (
            (self.validated - self.started) * 1000,
            (self.serialized - self.validated) * 1000,
            enqueue * 1000,
        )

    def fallback_outcome(self, error: type[ScriptpoolError], message: str) -> Outcome:
        """A ``fallback`` outcome decided by the client (the pool did not answer, or may not be asked)."""
        return self._client_side_outcome(FALLBACK, error, message)

    def error_outcome(self, error: type[ScriptpoolError], message: str) -> Outcome:
        """An ``error`` outcome decided by the client (the reply came but cannot be used)."""
        return self._client_side_outcome(ERROR, error, message)

    def _client_side_outcome(self, status: str, error: type[ScriptpoolError], message: str) -> Outcome:
        total_ms = round((time.perf_counter() - self.started) * 1000, 4)
        validate_ms, serialize_ms, enqueue_ms = (round(v, 4) for v in self.client_stages_ms())
        outcome = Outcome(
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
        if self.span is not None:
            end_call(self, outcome)
        return outcome


def admit(call: Call, limits: EpLimits, input: Any, payload: bytes, timeout: float) -> Outcome | None:
    """None if the call may go out; else its outcome (an open breaker). An input over the
    EP's limit raises."""
    check_input_size(payload, limits.for_input(input, payload))
    if not call.breaker.allow(timeout):
        shop, ep = call.job.shop_id, call.job.ep
        return call.fallback_outcome(CircuitOpen, f"circuit for {shop}/{ep} is open")
    return None


def read_outcome(call: Call, read: Future[T], group: str, *, what: str = "") -> T | Outcome:
    """What the read of the call's EP (or, naming ``what``, of its input queries) from the Redis
    of ``group`` means for the call, once the read ended or the call's deadline passed: what was
    read, or the call's outcome. An EP that is not defined raises
    (:class:`UnknownExtensionPoint`: a mistake in the call)."""
    if not read.done():
        call.breaker.failure()
        return call.fallback_outcome(
            BrokerUnavailable,
            f"Redis of group {group} did not answer before the deadline "
            f"(reading {what or f'extension point {call.job.ep!r}'})",
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
        raise fresh_copy(exc)  # UnknownExtensionPoint: a mistake in the call
    call.breaker.failure()
    if isinstance(exc, TRANSPORT_ERRORS):
        return call.fallback_outcome(BrokerUnavailable, f"cannot reach Redis: {exc}")
    return call.fallback_outcome(
        BrokerUnavailable, f"cannot read {what or f'extension point {call.job.ep!r}'}: {exc!r}"
    )


def reply_outcome(call: Call, raw: dict[str, Any]) -> Outcome:
    """The outcome a reply to ``call`` gives, with its timings; the call's breaker hears of it."""
    outcome = _reply_outcome(call, raw)
    if call.span is not None:
        end_call(call, outcome)
    return outcome


def _reply_outcome(call: Call, raw: dict[str, Any]) -> Outcome:
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
        if error.code == QuotaExceeded.code:
            # Refused without running (``quota_exceeded``): the pool answered, on purpose, so
            # the breaker hears nothing; the caller gets its fallback now, not at its deadline.
            return Outcome(FALLBACK, call.fallback, error.code, error, None, *where)
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


def fresh_copy(exc: ScriptpoolError) -> ScriptpoolError:
    """``exc`` anew: one read's error reaches several callers, each raising its own."""
    return type(exc)(exc.message, **exc.detail)
