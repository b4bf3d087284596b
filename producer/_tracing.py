"""The client's span for a call (``scriptpool.call``), when the host configured a tracer provider.

:class:`CallTracing` exists only then (``Client`` asks :func:`call_tracing` once, at
construction): a client without it does no tracing work per call but one ``is None`` test. With
it, :meth:`CallTracing.start` opens the call's span once the call is checked (a call refused as a
mistake raises before, and has none), as a child of the host's current span, and puts the span's
W3C context into the job (``Job.trace``); the publisher copies the first job's into the message
headers (``traceparent``, ``tracestate``), where Celery's instrumentation looks for it.
:func:`end_call` closes the span when the call's outcome is made, with what the outcome says.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Protocol

from scriptpool.config.tracing import ATTR, SPAN, carrier_of, guarded, host_tracer
from scriptpool.config.wire import Job

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from scriptpool.producer._outcome import Outcome


class Call(Protocol):
    """What of a call (``scriptpool.producer._calls.Call``) its span needs."""

    job: Job
    shard: int
    started: float
    span: Any


class CallTracing:
    """Opens each call's span on the host's tracer (see the module's docstring)."""

    __slots__ = ("_kind", "_tracer")

    def __init__(self, tracer: Tracer) -> None:
        from opentelemetry.trace import SpanKind

        self._tracer = tracer
        self._kind = SpanKind.CLIENT

    def start(self, call: Call, group: str) -> None:
        """Open ``call``'s span, back-dated to the call's start, and carry its context in the job
        (a failure here costs the call its span, never the call)."""
        guarded("call_start", lambda: self._start(call, group))

    def _start(self, call: Call, group: str) -> None:
        job = call.job
        started_ns = time.time_ns() - int((time.perf_counter() - call.started) * 1e9)
        attributes: dict[str, Any] = {
            ATTR.EP: job.ep,
            ATTR.SHOP: job.shop_id,
            ATTR.JOB: job.id,
            ATTR.SHARD: call.shard,
            ATTR.GROUP: group,
            ATTR.DEADLINE_MS: round((job.deadline - job.enqueued_at) * 1000, 3),
        }
        span = self._tracer.start_span(
            SPAN.CALL, kind=self._kind, attributes=attributes, start_time=started_ns
        )
        call.span = span
        carrier = carrier_of(span)
        if carrier:
            call.job = dataclasses.replace(job, trace=carrier)


def call_tracing() -> CallTracing | None:
    """The client's tracing, or None when this process has no tracer provider configured."""
    tracer = host_tracer()
    return None if tracer is None else CallTracing(tracer)


def end_call(call: Call, outcome: Outcome) -> None:
    """Close ``call``'s span (once) with its outcome: status, error code, fallback or not, the
    apps that ran, the worker, and the queue wait and total the client measured. A call that
    did not end ``ok`` sets the span's status to error, its description the error code."""
    span: Span | None = call.span
    if span is None:
        return
    call.span = None
    guarded("call_end", lambda: _end(span, outcome))


def _end(span: Span, outcome: Outcome) -> None:
    from opentelemetry.trace import Status, StatusCode

    timings = outcome.timings
    attributes: dict[str, Any] = {
        ATTR.STATUS: outcome.status,
        ATTR.FALLBACK: outcome.status == "fallback",
        ATTR.APPS: len(outcome.parts) or (1 if outcome.report is not None else 0),
        ATTR.QUEUE_WAIT_MS: timings.queue_wait_ms,
        ATTR.TOTAL_MS: timings.total_ms,
    }
    if outcome.worker:
        attributes[ATTR.WORKER] = outcome.worker
    if outcome.error_code:
        attributes[ATTR.ERROR_CODE] = outcome.error_code
    span.set_attributes(attributes)
    if outcome.status != "ok":
        span.set_status(Status(StatusCode.ERROR, outcome.error_code or outcome.status))
    span.end()


def abandon_call(call: Call, exc: BaseException) -> None:
    """Close ``call``'s span (once) for a call that raised instead of ending in an outcome (a
    mistake in the call, Redis's error on a strict call, an interruption): error status, the
    error's code (or its type's name)."""
    span: Span | None = call.span
    if span is None:
        return
    call.span = None
    guarded("call_end", lambda: _abandoned(span, exc))


def _abandoned(span: Span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    code = getattr(exc, "code", None)
    described = code if isinstance(code, str) else type(exc).__name__
    span.set_attributes({ATTR.STATUS: "raised", ATTR.ERROR_CODE: described})
    span.set_status(Status(StatusCode.ERROR, described))
    span.end()
