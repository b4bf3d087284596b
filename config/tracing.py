"""OpenTelemetry traces, what both ends of the queue share: whether tracing is on, the W3C
context a job carries, span and attribute names, and the worker's stages of a job as plain data.

Tracing is optional (the ``scriptpool[otel]`` extra) and costs nothing when off: nothing here
imports OpenTelemetry at module level, and :func:`host_tracer` answers None, without importing
anything, when the process never imported ``opentelemetry.trace`` (then nobody can have
configured a tracer provider). The client and the worker ask once (at construction) and keep
the answer, so a call or a job with tracing off takes one ``is None`` test and nothing else.

The worker builds its spans after the reply has gone, with explicit start and end times, from
the durations the :class:`~scriptpool.config.wire.ExecutionReport` already measures
(:func:`job_stages`); ``scriptpool run --trace`` builds the same tree from the reply, so the
tree it prints is the one the worker exports.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

    from scriptpool.config.wire import Execution, ExecutionReport, Part

__all__ = [
    "ATTR",
    "INSTRUMENTATION",
    "SPAN",
    "Stage",
    "carrier_of",
    "context_of",
    "guarded",
    "host_tracer",
    "job_stages",
]

T = TypeVar("T")

#: The instrumentation scope our spans are made under.
INSTRUMENTATION = "scriptpool"


class SPAN:
    """Span names (low cardinality: what varies is in the attributes)."""

    CALL = "scriptpool.call"  # the client's: one call, from its checks to its outcome
    JOB = "scriptpool.job"  # the worker's: one job, from its enqueue to its reply
    QUEUE_WAIT = "scriptpool.queue_wait"  # from the enqueue time the job carries to the worker's receipt
    LOOKUP = "scriptpool.lookup"  # binding and module: a cache hit, a load or a compile
    INSTANTIATE = "scriptpool.instantiate"
    GUEST = "scriptpool.guest"  # the script's own run (instructions, peak memory, trap code)
    DECODE = "scriptpool.decode"  # its output read back into JSON
    APP = "scriptpool.app"  # one app's script of a join or chain
    REDUCER = "scriptpool.reducer"  # a join's Wasm reducer
    REPLY = "scriptpool.reply"  # the push of the reply onto the caller's list
    SHADOW = "scriptpool.shadow"  # a rollout's shadow run, in a trace of its own linked to the job


class ATTR:
    """Attribute names, under ``scriptpool.``."""

    EP = "scriptpool.ep"
    SHOP = "scriptpool.shop"
    JOB = "scriptpool.job"
    SHARD = "scriptpool.shard"
    GROUP = "scriptpool.group"
    WORKER = "scriptpool.worker"
    DEADLINE_MS = "scriptpool.deadline_ms"
    STATUS = "scriptpool.status"  # ok, error or fallback (the client's); ok or error (the worker's)
    ERROR_CODE = "scriptpool.error.code"
    FALLBACK = "scriptpool.fallback"
    APPS = "scriptpool.apps"  # how many apps' scripts the call ran (a join's or chain's parts)
    APP = "scriptpool.app"
    VERSION = "scriptpool.version"
    MODULE_SOURCE = "scriptpool.module.source"  # hot, deserialized or compiled
    CACHE_HIT = "scriptpool.cache.hit"
    INSTRUCTIONS = "scriptpool.instructions"
    PEAK_MEMORY = "scriptpool.peak_memory_bytes"
    INPUT_BYTES = "scriptpool.input_bytes"
    OUTPUT_BYTES = "scriptpool.output_bytes"
    TRAP_CODE = "scriptpool.trap_code"
    EXIT_CODE = "scriptpool.exit_code"
    CODEC = "scriptpool.codec"
    ROLLOUT = "scriptpool.rollout"
    QUEUE_WAIT_MS = "scriptpool.queue_wait_ms"
    TOTAL_MS = "scriptpool.total_ms"
    REPLIED = "scriptpool.replied"  # false: the caller had given up, no reply was pushed
    SHADOW_RESULT = "scriptpool.shadow.result"  # match, mismatch, candidate_error, or not_judged
    # Set on a failed job's span by a worker with SCRIPTPOOL_TRACE_FAILURES=1: its sampler then
    # records the span (and the job's other spans) even when the caller's decision was not to.
    FORCED = "scriptpool.trace.forced"


def host_tracer() -> Tracer | None:
    """Our tracer when this process has a tracer provider configured (an SDK's, set with
    ``trace.set_tracer_provider``); None otherwise, also when OpenTelemetry is not installed or
    was never imported. Cheap when off: no import is made."""
    api = sys.modules.get("opentelemetry.trace")
    if api is None:
        return None  # never imported: nobody set a provider
    provider = api.get_tracer_provider()
    if isinstance(provider, (api.ProxyTracerProvider, api.NoOpTracerProvider)):
        return None
    tracer: Tracer = provider.get_tracer(INSTRUMENTATION)
    return tracer


def carrier_of(span: Span) -> dict[str, str]:
    """The context of ``span`` as the configured propagators write it (W3C ``traceparent`` and
    ``tracestate`` by default): what a message's headers and its job carry."""
    from opentelemetry import propagate, trace

    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def context_of(carrier: Mapping[str, str] | None) -> Context | None:
    """The caller's context a job carries (None: it carries none, the job's span is a root)."""
    if not carrier:
        return None
    from opentelemetry import propagate

    return propagate.extract(dict(carrier))


@dataclass(frozen=True, slots=True)
class Stage:
    """One span of a job's tree as plain data: name, start and end (Unix seconds), attributes,
    the error code if the stage failed, and its children."""

    name: str
    start: float
    end: float
    attributes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    children: tuple[Stage, ...] = ()

    @property
    def duration_ms(self) -> float:
        return max(0.0, (self.end - self.start) * 1000)


def job_stages(
    execution: Execution | None,
    *,
    enqueued_at: float,
    received: float,
    begun: float,
    finished: float,
    pushed: float,
    error_code: str | None = None,
) -> tuple[Stage, ...]:
    """The children of a job's span: the queue wait (from the enqueue time the job carries to
    the worker's receipt), the run's stages laid one after the other from ``begun`` (when the
    executor started) with the durations the report measured (a join's or chain's apps each
    with theirs, the Wasm reducer too), and the reply (``finished`` to ``pushed``).
    ``execution`` None: the worker failed (``error_code``) and only the queue wait and the
    reply are known. Times are Unix seconds; the queue wait is clamped at zero (clock skew)."""
    stages = [Stage(SPAN.QUEUE_WAIT, min(enqueued_at, received), received)]
    if execution is not None:
        report = execution.report
        at = begun
        lookup = _stage(SPAN.LOOKUP, at, report.lookup_ms, _lookup_attributes(report))
        stages.append(lookup)
        at = lookup.end
        if execution.parts:
            for part in execution.parts:
                app = _part(part, at)
                stages.append(app)
                at = app.end
        else:
            run = _run_stages(report, execution.error.code if execution.error else None, at, execution.error)
            stages.extend(run)
            at = run[-1].end if run else at
    stages.append(Stage(SPAN.REPLY, finished, max(finished, pushed), error=error_code))
    return tuple(stages)


def _stage(name: str, start: float, ms: float, attributes: dict[str, Any] | None = None) -> Stage:
    return Stage(name, start, start + max(ms, 0.0) / 1000, attributes or {})


def _lookup_attributes(report: ExecutionReport) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    if report.module_source:
        attributes[ATTR.MODULE_SOURCE] = report.module_source
        attributes[ATTR.CACHE_HIT] = report.module_source == "hot"
    return attributes


def _run_stages(report: ExecutionReport, code: str | None, at: float, error: Any) -> list[Stage]:
    """Instantiate, guest and decode of one script's run, from ``at``; the guest stage carries
    the run's costs and, if it failed, its error code, trap code or exit code."""
    instantiate = _stage(SPAN.INSTANTIATE, at, report.instantiate_ms)
    guest_attributes: dict[str, Any] = {
        ATTR.INSTRUCTIONS: report.instructions,
        ATTR.PEAK_MEMORY: report.peak_memory_bytes,
        ATTR.INPUT_BYTES: report.input_bytes,
        ATTR.OUTPUT_BYTES: report.output_bytes,
    }
    if report.codec:
        guest_attributes[ATTR.CODEC] = report.codec
    detail = getattr(error, "detail", None) or {}
    if "trap_code" in detail:
        guest_attributes[ATTR.TRAP_CODE] = str(detail["trap_code"])
    if type(detail.get("exit_code")) is int:
        guest_attributes[ATTR.EXIT_CODE] = detail["exit_code"]
    guest = Stage(
        SPAN.GUEST,
        instantiate.end,
        instantiate.end + max(report.run_ms, 0.0) / 1000,
        guest_attributes,
        error=code,
    )
    decode = _stage(SPAN.DECODE, guest.end, report.decode_ms)
    return [instantiate, guest, decode]


def _part(part: Part, at: float) -> Stage:
    from scriptpool.config.extension_points import REDUCER_APP

    code = part.error.code if part.error else None
    children = tuple(_run_stages(part.report, code, at, part.error)) if part.status != "skipped" else ()
    end = children[-1].end if children else at
    attributes: dict[str, Any] = {
        ATTR.APP: part.app,
        ATTR.VERSION: part.version,
        ATTR.STATUS: part.status,
    }
    if code:
        attributes[ATTR.ERROR_CODE] = code
    name = SPAN.REDUCER if part.app == REDUCER_APP else SPAN.APP
    return Stage(name, at, end, attributes, error=code, children=children)


_failed_once: set[str] = set()


def guarded(where: str, work: Callable[[], T]) -> T | None:
    """``work()``, or None if it raised: tracing is never a reason for a call or a job to fail
    (a misconfigured propagator, an exporter's bug). The first failure of each ``where`` is
    logged (``trace_failed``), the rest are not, so a broken setup does not flood the log."""
    try:
        return work()
    except Exception as exc:
        if where not in _failed_once:
            _failed_once.add(where)
            from scriptpool.config._logging import get_logger

            get_logger("tracing").warning("trace_failed", where=where, error=repr(exc)[:300])
        return None
