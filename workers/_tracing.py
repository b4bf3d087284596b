"""A worker's spans: one per job (``scriptpool.job``), a child of the caller's span, with the
queue wait, the run's stages and the reply under it (``scriptpool.config.tracing.job_stages``).

Set up per process after any fork (:func:`for_process`, from the ``WorkerState`` each process
makes for itself), when the ``scriptpool[otel]`` extra is installed and either the process
already has a tracer provider (``opentelemetry-instrument`` or the host's own code configured
one) or the standard variables ask for an exporter: ``OTEL_TRACES_EXPORTER=otlp``, or
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set (not empty), and
neither ``OTEL_SDK_DISABLED=true`` nor ``OTEL_TRACES_EXPORTER=none``. Then the SDK's
``TracerProvider`` (its resource and sampler from the standard variables; the sampler is
parent-based unless ``OTEL_TRACES_SAMPLER`` says otherwise) exports through a
``BatchSpanProcessor`` and the OTLP/HTTP exporter (which reads the ``OTEL_EXPORTER_OTLP_*``
variables itself). :func:`shutdown` flushes it when the worker stops.

Spans are made after the reply has gone, with explicit times, so the caller waits for none of
it. ``SCRIPTPOOL_TRACE_FAILURES=1`` records a failed job's spans even when the caller's decision
was not to sample: the job's span then carries ``scriptpool.trace.forced`` and our sampler
(around the configured one) samples it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from scriptpool.config import Settings, get_logger
from scriptpool.config.tracing import (
    ATTR,
    INSTRUMENTATION,
    SPAN,
    Stage,
    carrier_of,
    context_of,
    guarded,
    host_tracer,
    job_stages,
)
from scriptpool.config.wire import Execution, Job

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler, SamplingResult
    from opentelemetry.trace import Link, Span, SpanKind, Tracer
    from opentelemetry.trace.span import TraceState
    from opentelemetry.util.types import Attributes

log = get_logger("worker")

_provider: TracerProvider | None = None  # the one this module set up, to flush at shutdown
_provider_pid = 0
_tracing: JobTracing | None = None
_tracing_pid = 0
_untraced_pid = 0  # a prefork pool's parent: it runs no job, and must not set the SDK up before forking


def not_in_this_process() -> None:
    """This process runs no job (a prefork pool's parent): it sets no tracing up, so that each
    child sets up its own after its fork, with no exporter thread or connection inherited."""
    global _untraced_pid
    _untraced_pid = os.getpid()


def exporter_wanted(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether the standard variables ask this process to export traces over OTLP."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = [e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if "none" in exporters:
        return False
    if "otlp" in exporters:
        return True
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    )


def for_process(settings: Settings) -> JobTracing | None:
    """This process's job tracing, set up on first use (after any fork); None when off."""
    global _tracing, _tracing_pid
    if _untraced_pid == os.getpid():
        return None
    if _tracing_pid == os.getpid():
        return _tracing
    _tracing, _tracing_pid = None, os.getpid()
    tracer = host_tracer()
    if tracer is None and exporter_wanted():
        # A setting the SDK cannot use (a malformed OTEL_* value) costs the worker its traces,
        # logged, never its start.
        tracer = guarded("setup", _configure)
    if tracer is not None:
        _tracing = guarded("setup", lambda: JobTracing(tracer, force_failures=settings.trace_failures))
    return _tracing


def _configure() -> Tracer | None:
    """The SDK with the OTLP/HTTP exporter, batched, as this process's tracer provider."""
    global _provider, _provider_pid
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning("tracing_unavailable", reason=f"install scriptpool[otel]: {exc}")
        return None
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if protocol.strip() and protocol.strip() != "http/protobuf":
        log.warning("tracing_protocol_ignored", protocol=protocol, used="http/protobuf")
    attributes: dict[str, Any] = {}
    if "OTEL_SERVICE_NAME" not in os.environ and "service.name" not in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes["service.name"] = "scriptpool-worker"
    provider = TracerProvider(resource=Resource.create(attributes), sampler=_force_failed_sampler())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider, _provider_pid = provider, os.getpid()
    log.info(
        "tracing_configured",
        pid=os.getpid(),
        exporter="otlp/http",
        sampler=provider.sampler.get_description(),
    )
    return provider.get_tracer(INSTRUMENTATION)


def shutdown() -> None:
    """Flush and stop the provider this process set up (at the worker's stop)."""
    global _provider
    provider = _provider
    if provider is None or _provider_pid != os.getpid():
        return
    _provider = None
    try:
        provider.shutdown()
    except Exception as exc:  # a collector that does not answer must not hold the stop
        log.warning("tracing_shutdown_failed", error=repr(exc)[:200])


class JobTracing:
    """Makes a job's spans on ``tracer`` (see the module's docstring)."""

    def __init__(self, tracer: Tracer, *, force_failures: bool = False) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self._tracer = tracer
        self._trace = trace
        self._consumer: SpanKind = SpanKind.CONSUMER
        self._internal: SpanKind = SpanKind.INTERNAL
        self._status = Status
        self._error = StatusCode.ERROR
        self.force_failures = force_failures

    def executed(
        self,
        job: Job,
        execution: Execution,
        shard: int,
        worker: str,
        *,
        received: float,
        begun: float,
        finished: float,
        pushed: float,
        replied: bool,
    ) -> dict[str, str] | None:
        """The spans of a job that ran (its script succeeded or failed); the job span's context
        if it was recorded and a rollout's shadow run may follow (which links to it). A failure
        here costs the job its spans, never its run."""
        times = {"received": received, "begun": begun, "finished": finished, "pushed": pushed}
        return guarded("job", lambda: self._executed(job, execution, shard, worker, replied, times))

    def _executed(
        self,
        job: Job,
        execution: Execution,
        shard: int,
        worker: str,
        replied: bool,
        times: dict[str, float],
    ) -> dict[str, str] | None:
        received, begun, finished, pushed = (
            times["received"], times["begun"], times["finished"], times["pushed"]
        )  # fmt: skip
        report = execution.report
        code = execution.error.code if execution.error else None
        attributes = self._job_attributes(job, shard, worker)
        attributes.update(
            {
                ATTR.STATUS: execution.status,
                ATTR.VERSION: report.version,
                ATTR.INSTRUCTIONS: report.instructions,
                ATTR.PEAK_MEMORY: report.peak_memory_bytes,
                ATTR.APPS: len(execution.parts) or 1,
                ATTR.REPLIED: replied,
            }
        )
        if report.module_source:
            attributes[ATTR.MODULE_SOURCE] = report.module_source
        if report.app:
            attributes[ATTR.APP] = report.app
        if report.rollout:
            attributes[ATTR.ROLLOUT] = report.rollout
        stages = job_stages(
            execution,
            enqueued_at=job.enqueued_at,
            received=received,
            begun=begun,
            finished=finished,
            pushed=pushed,
        )
        span = self._emit(job, attributes, code, stages, end=max(pushed, finished))
        return carrier_of(span) if span is not None and report.rollout else None

    def failed(
        self,
        job: Job,
        error_code: str,
        shard: int,
        worker: str,
        *,
        received: float,
        finished: float,
        pushed: float,
    ) -> None:
        """The spans of a job the worker failed to run (``worker_error`` and the like); a failure
        here costs the job its spans, nothing else."""
        guarded(
            "job",
            lambda: self._failed(
                job, error_code, shard, worker, received=received, finished=finished, pushed=pushed
            ),
        )

    def _failed(
        self,
        job: Job,
        error_code: str,
        shard: int,
        worker: str,
        *,
        received: float,
        finished: float,
        pushed: float,
    ) -> None:
        """The spans of a job the worker failed to run (``worker_error`` and the like)."""
        attributes = self._job_attributes(job, shard, worker)
        attributes[ATTR.STATUS] = "error"
        stages = job_stages(
            None,
            enqueued_at=job.enqueued_at,
            received=received,
            begun=received,
            finished=finished,
            pushed=pushed,
            error_code=None,
        )
        self._emit(job, attributes, error_code, stages, end=max(pushed, finished))

    def _job_attributes(self, job: Job, shard: int, worker: str) -> dict[str, Any]:
        return {
            ATTR.EP: job.ep,
            ATTR.SHOP: job.shop_id,
            ATTR.JOB: job.id,
            ATTR.SHARD: shard,
            ATTR.WORKER: worker,
            ATTR.DEADLINE_MS: round((job.deadline - job.enqueued_at) * 1000, 3),
        }

    def _emit(
        self, job: Job, attributes: dict[str, Any], code: str | None, stages: Sequence[Stage], *, end: float
    ) -> Span | None:
        if code:
            attributes[ATTR.ERROR_CODE] = code
            if self.force_failures:
                attributes[ATTR.FORCED] = True
        parent = context_of(job.trace)
        start = min(job.enqueued_at, stages[0].start) if stages else job.enqueued_at
        span = self._tracer.start_span(
            SPAN.JOB, context=parent, kind=self._consumer, attributes=attributes, start_time=_ns(start)
        )
        if not span.is_recording():
            return None  # not sampled: its children would not be either
        if code:
            span.set_status(self._status(self._error, code))
        self._children(span, stages)
        span.end(end_time=_ns(end))
        return span

    def shadow(
        self, linked: dict[str, str], ep: str, shop: str, start: float, end: float, result: str
    ) -> None:
        """See :meth:`_shadow` (a failure costs the shadow run its span, never the run)."""
        guarded("shadow", lambda: self._shadow(linked, ep, shop, start, end, result))

    def _shadow(
        self, linked: dict[str, str], ep: str, shop: str, start: float, end: float, result: str
    ) -> None:
        """The span of a rollout's shadow run (``scriptpool.shadow``, in the shadow process): a
        trace of its own, linked to the live job's span, not its child (the caller never waits
        for it)."""
        from opentelemetry.context import Context
        from opentelemetry.trace import Link

        job = self._trace.get_current_span(context_of(linked)).get_span_context()
        links = [Link(job)] if job.is_valid else []
        attributes = {ATTR.EP: ep, ATTR.SHOP: shop, ATTR.SHADOW_RESULT: result}
        span = self._tracer.start_span(
            SPAN.SHADOW, context=Context(), kind=self._internal, attributes=attributes, links=links,
            start_time=_ns(start),
        )  # fmt: skip
        span.end(end_time=_ns(end))

    def _children(self, parent: Span, stages: Sequence[Stage]) -> None:
        context = self._trace.set_span_in_context(parent)
        for stage in stages:
            span = self._tracer.start_span(
                stage.name,
                context=context,
                kind=self._internal,
                attributes=stage.attributes,
                start_time=_ns(stage.start),
            )
            if stage.error:
                span.set_status(self._status(self._error, stage.error))
            if stage.children:
                self._children(span, stage.children)
            span.end(end_time=_ns(stage.end))


def _ns(seconds: float) -> int:
    # Never before the epoch: an exporter refuses a negative time, and with it the whole batch.
    return max(0, int(seconds * 1e9)) if seconds == seconds else 0


def _force_failed_sampler() -> Sampler:
    """The sampler the standard variables choose (the SDK's own choice: parent-based, always on,
    unless ``OTEL_TRACES_SAMPLER`` says otherwise), except that a span marked
    ``scriptpool.trace.forced`` (a failed job's, with SCRIPTPOOL_TRACE_FAILURES=1) is always
    recorded and sampled. Its children follow it as any child follows its parent."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import sampling

    class ForceFailed(sampling.Sampler):
        def __init__(self, delegate: sampling.Sampler) -> None:
            self._delegate = delegate

        def should_sample(
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Attributes = None,
            links: Sequence[Link] | None = None,
            trace_state: TraceState | None = None,
        ) -> SamplingResult:
            if attributes and attributes.get(ATTR.FORCED):
                parent = trace.get_current_span(parent_context).get_span_context()
                return sampling.SamplingResult(
                    sampling.Decision.RECORD_AND_SAMPLE, attributes, parent.trace_state
                )
            return self._delegate.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"ForceFailed{{{self._delegate.get_description()}}}"

    # The sampler the standard variables choose, as the SDK itself chooses it: a provider made
    # for nothing else (no processors, no exit hook) gives it through its public ``sampler``.
    from opentelemetry.sdk.trace import TracerProvider

    return ForceFailed(TracerProvider(shutdown_on_exit=False).sampler)
