"""``scriptpool run --trace``: the trace of one call as a readable tree, without a tracing backend.

The command configures the OpenTelemetry SDK in its own process with an in-memory exporter
before it makes its client, so the client's span (``scriptpool.call``) is a real one, with a
real trace id, whose context the job carries to the worker. The worker's part is rebuilt from
the reply: the worker derives its spans from the timings its reply carries anyway (the queue
wait from the job's enqueue time, the report's lookup, instantiate, run and decode, each part's),
with :func:`scriptpool.config.tracing.job_stages`, and this does the same with the same
function. So the reply needs nothing new, and the tree printed is the one a tracing worker
exports under that trace id; what the reply cannot say, it does not show (the worker's own
time before the run, such as the quota check, is the gap before ``lookup``; the reply line is
the client's ``result`` time: the push, its delivery and decoding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scriptpool.config.errors import ConfigurationError
from scriptpool.config.tracing import ATTR, SPAN, Stage, job_stages

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from scriptpool.producer import Outcome


def start_tracing() -> InMemorySpanExporter:
    """This process's tracer provider: the SDK, every span kept in memory."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        raise ConfigurationError("run --trace needs OpenTelemetry: pip install 'scriptpool[otel]'") from None
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def call_tree(exporter: InMemorySpanExporter, outcome: Outcome) -> tuple[str, Stage] | None:
    """The call's trace id and its tree (the call, and under it the job as the reply tells it);
    None if the call made no span."""
    calls = [span for span in exporter.get_finished_spans() if span.name == SPAN.CALL]
    if not calls:
        return None
    span = calls[-1]
    assert span.start_time is not None and span.end_time is not None  # a finished span
    start, end = span.start_time / 1e9, span.end_time / 1e9
    children: tuple[Stage, ...] = ()
    t = outcome.timings
    if outcome.worker:
        enqueued_at = start + (t.validate_ms + t.serialize_ms) / 1000
        received = enqueued_at + (t.enqueue_ms + t.queue_wait_ms) / 1000
        finished = received + t.execute_ms / 1000
        execution = _execution_of(outcome)
        stages = job_stages(
            execution,
            enqueued_at=enqueued_at,
            received=received,
            begun=received,
            finished=finished,
            pushed=finished + t.result_ms / 1000,
        )
        job_attributes = {ATTR.WORKER: outcome.worker, ATTR.SHARD: outcome.shard}
        children = (Stage(SPAN.JOB, enqueued_at, stages[-1].end, job_attributes, outcome.error_code, stages),)
    attributes = dict(span.attributes or {})
    root = Stage(SPAN.CALL, start, end, attributes, outcome.error_code, children)
    return format(span.context.trace_id, "032x"), root


def _execution_of(outcome: Outcome) -> Any:
    from scriptpool.config.wire import ErrorInfo, Execution, ExecutionReport

    if outcome.report is None and not outcome.parts:
        return None  # the worker answered without running (a refusal, its own failure)
    error: ErrorInfo | None = outcome.error if outcome.status != "ok" else None
    return Execution(outcome.ok, None, error, outcome.report or ExecutionReport(), tuple(outcome.parts))


def render(trace_id: str, root: Stage) -> list[str]:
    """The tree as text lines: each stage's name, its start from the call's, its duration, and
    what matters of its attributes."""
    lines = [f"trace {trace_id}", f"{'stage':<44} {'start ms':>9} {'duration ms':>12}"]

    def walk(stage: Stage, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        name = prefix + branch + stage.name.removeprefix("scriptpool.")
        offset = (stage.start - root.start) * 1000
        note = _note(stage)
        lines.append(f"{name:<44} {offset:>9.3f} {stage.duration_ms:>12.3f}  {note}".rstrip())
        inner = prefix + ("" if top else ("   " if last else "│  "))
        for n, child in enumerate(stage.children):
            walk(child, inner, n == len(stage.children) - 1, False)

    walk(root, "", True, True)
    return lines


def _note(stage: Stage) -> str:
    a = stage.attributes
    words: list[str] = []
    if stage.name == SPAN.CALL:
        words.append(f"{a.get(ATTR.EP)}/{a.get(ATTR.SHOP)} {a.get(ATTR.STATUS)}")
        words.append(f"shard {a.get(ATTR.SHARD)}")
    elif stage.name == SPAN.JOB:
        words.append(f"worker {a.get(ATTR.WORKER)}")
    elif stage.name == SPAN.LOOKUP and ATTR.MODULE_SOURCE in a:
        words.append("cache hit" if a.get(ATTR.CACHE_HIT) else f"module {a[ATTR.MODULE_SOURCE]}")
    elif stage.name == SPAN.GUEST:
        words.append(f"{a.get(ATTR.INSTRUCTIONS, 0):,} instructions, {a.get(ATTR.PEAK_MEMORY, 0):,} B peak")
        if ATTR.TRAP_CODE in a:
            words.append(f"trap {a[ATTR.TRAP_CODE]}")
        if ATTR.EXIT_CODE in a:
            words.append(f"exit {a[ATTR.EXIT_CODE]}")
    elif stage.name in (SPAN.APP, SPAN.REDUCER):
        words.append(f"app {a.get(ATTR.APP)} v{a.get(ATTR.VERSION)} {a.get(ATTR.STATUS)}")
    if stage.error:
        words.append(f"error {stage.error}")
    return ", ".join(words)


def as_json(trace_id: str, root: Stage) -> dict[str, Any]:
    """The tree as JSON: each stage's name, start (ms from the call's), duration, attributes,
    error and children."""

    def node(stage: Stage) -> dict[str, Any]:
        return {
            "name": stage.name,
            "start_ms": round((stage.start - root.start) * 1000, 3),
            "duration_ms": round(stage.duration_ms, 3),
            "attributes": dict(stage.attributes),
            "error": stage.error,
            "children": [node(child) for child in stage.children],
        }

    return {"trace_id": trace_id, "root": node(root)}
