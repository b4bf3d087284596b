"""OpenTelemetry traces (README "Traces") against the real SDK: the host's spans in an in-memory
exporter, real workers exporting over OTLP/HTTP to a receiver this module runs on loopback.

One call is one trace across both processes: the worker's job span is a child of the client's
call span, its stages children of the job; the queue-wait span lasts what the outcome reports
as queue wait and enqueue; failures, fallbacks and a join's parts carry their attributes; a
failed run is recorded even when the caller did not sample, with SCRIPTPOOL_TRACE_FAILURES=1;
``run --trace`` prints the tree; and with tracing off nothing is imported, carried or made.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags

from scriptpool import Client, Registry, Settings
from scriptpool.config.errors import UnknownExtensionPoint
from scriptpool.config.tracing import ATTR, SPAN, context_of
from scriptpool.config.wire import Job
from scriptpool.registry import RolloutRules
from scriptpool.testing import worker_argv
from tests import guests
from tests.conftest import ROOT, TEST_ARTIFACT_KEY, deployer_fixture
from tests.pool import WorkerProcess, pid_of, shop_on, worker_env

# Shard 0: a worker that traces (and forces failed runs into the trace); shard 1: one that does
# not; shard 2: no worker (its calls time out, their messages stay in the queue to look at);
# shard 3: a prefork pool that traces, started by its test.
SHARDS = 4


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: ``POST /v1/traces`` with a protobuf
    ``ExportTraceServiceRequest``, decoded into one dict per span."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.add(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource in request.resource_spans:
            service = {a.key: _value(a.value) for a in resource.resource.attributes}.get("service.name")
            for scope in resource.scope_spans:
                for span in scope.spans:
                    spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_id": span.parent_span_id.hex(),
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                            "error": span.status.code == 2,  # STATUS_CODE_ERROR
                            "links": [link.span_id.hex() for link in span.links],
                            "service": service,
                        }
                    )
        with self.lock:
            self.spans.extend(spans)

    def trace(self, trace_id: str, *, until: str = SPAN.JOB, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The spans of ``trace_id`` received so far, once one named ``until`` is among them."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [s for s in self.spans if s["trace_id"] == trace_id]
            if any(s["name"] == until for s in found) or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """The OTLP/HTTP receiver the tracing worker exports to."""
    running = Receiver()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def pool_settings(redis_url: str) -> Settings:
    """Three shards on the test Redis."""
    return Settings(redis_url=redis_url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS)


@pytest.fixture(scope="module")
def workers(pool_settings: Settings, receiver: Receiver) -> Iterator[dict[str, WorkerProcess]]:
    """A worker of shard 0 that exports over OTLP/HTTP with the standard variables (spans sent
    every 50 ms), forcing failed runs into the trace; one of shard 1 without them."""
    traced = WorkerProcess(
        pool_settings,
        [0],
        "traced",
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_SERVICE_NAME": "scriptpool-test-worker",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "SCRIPTPOOL_TRACE_FAILURES": "1",
        },
    )
    plain = WorkerProcess(pool_settings, [1], "plain")
    started = [traced, plain]
    try:
        for worker in started:
            worker.wait_ready()
    except BaseException:
        for worker in started:
            worker.kill()
        raise
    yield {worker.name: worker for worker in started}
    for worker in started:
        worker.stop()


deployer = deployer_fixture((), scope="module", after=("workers",))


@pytest.fixture(scope="module")
def host_spans() -> Iterator[InMemorySpanExporter]:
    """This process's tracer provider for the module: the SDK, spans kept in memory. Afterwards
    the global provider is unset again (the API allows setting it once per process: the
    module resets its private flag, as OpenTelemetry's own tests do)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    from opentelemetry.util._once import Once

    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture(scope="module")
def client(pool_settings: Settings, workers: object, host_spans: InMemorySpanExporter) -> Iterator[Client]:
    """A client made once the host's tracer provider is set, as a host does it."""
    with Client(pool_settings) as made:
        yield made


def _call_span(spans: InMemorySpanExporter, job_id: str | None) -> ReadableSpan:
    found = [s for s in spans.get_finished_spans() if (s.attributes or {}).get(ATTR.JOB) == job_id]
    assert len(found) == 1, found
    return found[0]


def _ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def test_one_call_is_one_trace_across_client_and_worker(
    deployer: Registry, client: Client, host_spans: InMemorySpanExporter, receiver: Receiver
) -> None:
    """The worker's job span is a child of the client's call span, in the same trace; the
    queue wait, lookup, instantiate, guest, decode and reply spans are children of the job in
    that order; the queue-wait span lasts what the outcome reports as enqueue plus queue wait
    (the worker cannot tell the publish from the wait: both are from the same two instants)."""
    deployer.define_extension_point("traced")
    shop = shop_on(0, SHARDS)
    deployer.deploy("traced", shop, guests.ECHO)
    client.run("traced", shop, {"warm": 1}, timeout=5)  # the module is hot from here on
    outcome = client.run("traced", shop, {"n": 1}, timeout=5)
    assert outcome.ok, outcome
    call = _call_span(host_spans, outcome.job_id)
    trace_id, call_id = _ids(call)
    attributes = dict(call.attributes or {})
    assert attributes[ATTR.EP] == "traced" and attributes[ATTR.SHOP] == shop
    assert (attributes[ATTR.SHARD], attributes[ATTR.STATUS], attributes[ATTR.FALLBACK]) == (0, "ok", False)
    assert attributes[ATTR.APPS] == 1 and attributes[ATTR.DEADLINE_MS] == 5000
    assert attributes[ATTR.WORKER] == outcome.worker and attributes[ATTR.GROUP]
    assert call.kind == trace.SpanKind.CLIENT and call.status.status_code != StatusCode.ERROR

    spans = receiver.trace(trace_id)
    job = next(s for s in spans if s["name"] == SPAN.JOB)
    assert job["parent_id"] == call_id and job["service"] == "scriptpool-test-worker"
    assert job["attributes"][ATTR.JOB] == outcome.job_id and job["attributes"][ATTR.STATUS] == "ok"
    assert job["attributes"][ATTR.MODULE_SOURCE] == "hot"
    children = sorted((s for s in spans if s["parent_id"] == job["span_id"]), key=lambda s: s["start"])
    assert [s["name"] for s in children] == [
        SPAN.QUEUE_WAIT, SPAN.LOOKUP, SPAN.INSTANTIATE, SPAN.GUEST, SPAN.DECODE, SPAN.REPLY,
    ]  # fmt: skip
    by_name = {s["name"]: s for s in children}
    assert by_name[SPAN.LOOKUP]["attributes"][ATTR.CACHE_HIT] is True
    assert outcome.report is not None
    assert by_name[SPAN.GUEST]["attributes"][ATTR.INSTRUCTIONS] == outcome.report.instructions
    assert by_name[SPAN.GUEST]["attributes"][ATTR.PEAK_MEMORY] == outcome.report.peak_memory_bytes
    wait = by_name[SPAN.QUEUE_WAIT]
    waited_ms = (wait["end"] - wait["start"]) / 1e6
    reported_ms = outcome.timings.queue_wait_ms + outcome.timings.enqueue_ms
    # Both from the job's enqueued_at and the worker's receipt; rounded to 0.1 us and 1 ns.
    assert abs(waited_ms - reported_ms) < 0.01, (waited_ms, reported_ms)
    # The job's span ends after its reply. What the worker did before the reply went lies within
    # the call (one machine, one clock); the reply's own end is stamped after the write, which
    # a busy machine may delay past the moment the caller had its answer.
    assert job["end"] >= by_name[SPAN.REPLY]["end"]
    assert call.start_time is not None and call.end_time is not None
    assert call.start_time <= job["start"] and by_name[SPAN.DECODE]["end"] <= call.end_time


def test_a_failed_run_carries_its_error_and_trap_code(
    deployer: Registry, client: Client, host_spans: InMemorySpanExporter, receiver: Receiver
) -> None:
    """A script that traps: the call span says error and ``runtime_error``, not a fallback;
    the worker's job span is an error too, and its guest span names the trap."""
    deployer.define_extension_point("trapped")
    shop = shop_on(0, SHARDS, skip=1)
    deployer.deploy("trapped", shop, guests.TRAP)
    outcome = client.run("trapped", shop, {}, timeout=5, fallback={"none": True})
    assert (outcome.status, outcome.error_code) == ("error", "runtime_error")
    call = _call_span(host_spans, outcome.job_id)
    attributes = dict(call.attributes or {})
    assert (attributes[ATTR.STATUS], attributes[ATTR.ERROR_CODE], attributes[ATTR.FALLBACK]) == (
        "error",
        "runtime_error",
        False,
    )
    assert call.status.status_code == StatusCode.ERROR and call.status.description == "runtime_error"
    trace_id, _ = _ids(call)
    spans = receiver.trace(trace_id)
    job = next(s for s in spans if s["name"] == SPAN.JOB)
    assert job["error"] and job["attributes"][ATTR.ERROR_CODE] == "runtime_error"
    guest = next(s for s in spans if s["name"] == SPAN.GUEST)
    assert guest["error"] and guest["attributes"][ATTR.TRAP_CODE]
    assert outcome.error is not None
    assert guest["attributes"][ATTR.TRAP_CODE] == str(outcome.error.detail["trap_code"])


def test_a_fallback_is_said_and_the_message_headers_carry_the_context(
    deployer: Registry, client: Client, host_spans: InMemorySpanExporter, pool_settings: Settings
) -> None:
    """A call to a shard nobody serves times out: its span says ``fallback`` and ``timeout``;
    its message waits in the queue with ``traceparent`` in its headers, where Celery's
    instrumentation reads it, and the same context in its job."""
    shop = shop_on(2, SHARDS)
    deployer.define_extension_point("unserved")
    outcome = client.run("unserved", shop, {}, timeout=0.3, fallback={"safe": True})
    assert (outcome.status, outcome.error_code, outcome.output) == ("fallback", "timeout", {"safe": True})
    call = _call_span(host_spans, outcome.job_id)
    attributes = dict(call.attributes or {})
    assert (attributes[ATTR.STATUS], attributes[ATTR.ERROR_CODE], attributes[ATTR.FALLBACK]) == (
        "fallback",
        "timeout",
        True,
    )
    assert ATTR.WORKER not in attributes and attributes[ATTR.APPS] == 0
    trace_id, span_id = _ids(call)
    queues = redis.Redis.from_url(pool_settings.redis_url)
    queued = [json.loads(raw) for raw in queues.lrange(pool_settings.keys.queue(2), 0, -1)]
    mine = [m for m in queued if m["headers"]["id"] == outcome.job_id]
    assert len(mine) == 1
    version, carried_trace, carried_span, flags = mine[0]["headers"]["traceparent"].split("-")
    assert (version, carried_trace, carried_span) == ("00", trace_id, span_id)
    assert int(flags, 16) & 1  # sampled (the SDK may also set W3C's random-trace-id flag)
    args, _kwargs, _embed = msgpack.unpackb(base64.b64decode(mine[0]["body"]), raw=False)
    assert args[0]["trace"]["traceparent"] == mine[0]["headers"]["traceparent"]  # the job's own
    assert mine[0]["headers"]["task"] and mine[0]["headers"]["root_id"] == outcome.job_id
    queues.delete(pool_settings.keys.queue(2))
    queues.close()


def test_a_call_that_raises_still_ends_its_span(
    deployer: Registry, client: Client, host_spans: InMemorySpanExporter
) -> None:
    """A call that raises instead of ending in an outcome (here: an EP nobody defined) still
    closes its span, as an error with the error's code, so the trace shows the failed call."""
    host_spans.clear()
    with pytest.raises(UnknownExtensionPoint):
        client.run("never-defined", shop_on(0, SHARDS), {}, timeout=2)
    (span,) = [s for s in host_spans.get_finished_spans() if s.name == SPAN.CALL]
    attributes = dict(span.attributes or {})
    assert (attributes[ATTR.STATUS], attributes[ATTR.ERROR_CODE]) == ("raised", UnknownExtensionPoint.code)
    assert span.status.status_code == StatusCode.ERROR


def test_a_join_has_a_span_per_app(
    deployer: Registry, client: Client, host_spans: InMemorySpanExporter, receiver: Receiver
) -> None:
    """A join's apps each get a span (app, version, status) with their own stages under it; the
    app that failed is an error with its code, and the call span counts both apps."""
    deployer.define_extension_point("tracedjoin", combine="join", reducer="first")
    shop = shop_on(0, SHARDS, skip=2)
    deployer.deploy("tracedjoin", shop, guests.ECHO, app="a")
    deployer.deploy("tracedjoin", shop, guests.TRAP, app="b")
    outcome = client.run("tracedjoin", shop, {"n": 2}, timeout=5)
    assert outcome.ok and [p.status for p in outcome.parts] == ["ok", "error"]
    call = _call_span(host_spans, outcome.job_id)
    assert (call.attributes or {})[ATTR.APPS] == 2
    trace_id, _ = _ids(call)
    spans = receiver.trace(trace_id)
    job = next(s for s in spans if s["name"] == SPAN.JOB)
    apps = sorted((s for s in spans if s["name"] == SPAN.APP), key=lambda s: s["start"])
    assert [s["parent_id"] for s in apps] == [job["span_id"]] * 2
    assert [(s["attributes"][ATTR.APP], s["attributes"][ATTR.STATUS]) for s in apps] == [
        ("a", "ok"),
        ("b", "error"),
    ]
    assert apps[1]["error"] and apps[1]["attributes"][ATTR.ERROR_CODE] == "runtime_error"
    for app in apps:
        stages = [s["name"] for s in spans if s["parent_id"] == app["span_id"]]
        assert sorted(stages) == sorted([SPAN.INSTANTIATE, SPAN.GUEST, SPAN.DECODE])


def test_sampling_follows_the_caller_but_a_failed_run_is_forced_in(
    deployer: Registry, client: Client, host_spans: InMemorySpanExporter, receiver: Receiver
) -> None:
    """Under a caller's context that is not sampled, the client records no span and the worker
    none for a run that succeeds; a run that fails is recorded all the same by a worker with
    SCRIPTPOOL_TRACE_FAILURES=1, in the caller's trace, its job span marked as forced."""
    deployer.define_extension_point("unsampled")
    ok_shop, bad_shop = shop_on(0, SHARDS, skip=3), shop_on(0, SHARDS, skip=4)
    deployer.deploy("unsampled", ok_shop, guests.ECHO)
    deployer.deploy("unsampled", bad_shop, guests.TRAP)
    trace_id = 0x5CE0_0000_0000_0000_0000_0000_0000_0001
    parent = SpanContext(trace_id, 0x0000_0000_0000_00AB, is_remote=True, trace_flags=TraceFlags(0))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        before = len(host_spans.get_finished_spans())
        ok = client.run("unsampled", ok_shop, {}, timeout=5)
        bad = client.run("unsampled", bad_shop, {}, timeout=5)
    finally:
        otel_context.detach(token)
    assert ok.ok and bad.error_code == "runtime_error"
    assert len(host_spans.get_finished_spans()) == before  # the client followed its parent
    spans = receiver.trace(format(trace_id, "032x"))
    jobs = [s for s in spans if s["name"] == SPAN.JOB]
    # Spans leave a worker in order: once the failed run's are here, the good run's would be.
    assert [j["attributes"][ATTR.JOB] for j in jobs] == [bad.job_id]
    assert jobs[0]["attributes"][ATTR.FORCED] is True and jobs[0]["error"]
    assert {s["name"] for s in spans if s["parent_id"] == jobs[0]["span_id"]} >= {SPAN.QUEUE_WAIT, SPAN.GUEST}


def test_run_trace_prints_the_tree(
    deployer: Registry, pool_settings: Settings, workers: object, receiver: Receiver
) -> None:
    """``scriptpool run --trace`` prints the outcome, then the trace id and the tree of stages
    with their durations; the tracing worker exported its spans under that trace id."""
    deployer.define_extension_point("cli")
    shop = shop_on(0, SHARDS, skip=5)
    deployer.deploy("cli", shop, guests.ECHO)
    env = worker_env(pool_settings)
    result = subprocess.run(
        [sys.executable, "-m", "scriptpool", "run", "cli", shop, "--trace", "--timeout-ms", "5000"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    head = next(n for n, line in enumerate(lines) if line.startswith("trace "))
    trace_id = lines[head].split()[1]
    assert len(trace_id) == 32
    names = [re.sub(r"^[\s│├└─]+", "", line).split()[0] for line in lines[head + 2 :]]
    assert names == ["call", "job", "queue_wait", "lookup", "instantiate", "guest", "decode", "reply"]
    assert "instructions" in lines[head + 2 + 5]
    assert any(s["name"] == SPAN.JOB for s in receiver.trace(trace_id))
    as_json = subprocess.run(
        [sys.executable, "-m", "scriptpool", "run", "cli", shop, "--trace", "--json", "--timeout-ms", "5000"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert as_json.returncode == 0, as_json.stderr
    tree = json.loads(as_json.stdout)["trace"]
    assert len(tree["trace_id"]) == 32 and tree["root"]["name"] == SPAN.CALL
    (job,) = tree["root"]["children"]
    assert job["children"][0]["name"] == SPAN.QUEUE_WAIT
    local = subprocess.run(
        [sys.executable, "-m", "scriptpool", "run", "--local", "x.wasm", "--trace"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert local.returncode == 2 and "--trace goes with a run through the pool" in local.stderr


def test_off_nothing_is_imported_carried_or_made(
    deployer: Registry, pool_settings: Settings, workers: dict[str, WorkerProcess]
) -> None:
    """A host that configured no tracer provider imports nothing of OpenTelemetry (redis-py 8
    imports its API and metrics SDK by itself when they are installed: nothing more is loaded
    here, neither the propagators nor the trace SDK), its client takes one ``is None`` test per
    call and its jobs carry no context; and a worker without the OTEL variables never sets
    tracing up."""
    deployer.define_extension_point("untraced")
    shop = shop_on(1, SHARDS)
    deployer.deploy("untraced", shop, guests.ECHO)
    script = textwrap.dedent(
        f"""
        import sys, json
        import redis
        before = {{name for name in sys.modules if name.startswith("opentelemetry")}}
        from scriptpool import Client, Settings
        from scriptpool.config.wire import Job
        carried = []
        to_wire = Job.to_wire
        Job.to_wire = lambda job: carried.append(job.trace) or to_wire(job)
        settings = Settings.from_env()
        with Client(settings) as client:
            assert client._tracing is None
            outcome = client.run("untraced", {shop!r}, {{"n": 3}}, timeout=5)
        loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
        print(json.dumps({{"status": outcome.status, "loaded": sorted(set(loaded) - before),
                           "carried": carried}}))
        """
    )
    env = {**worker_env(pool_settings)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer == {"status": "ok", "loaded": [], "carried": [None]}
    log = workers["plain"].log()
    assert '"tracing_configured"' not in log and "opentelemetry" not in log
    assert '"tracing_configured"' in workers["traced"].log()
    assert os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") is None


def test_a_shadow_run_is_linked_to_the_job_not_its_child(
    deployer: Registry, client: Client, host_spans: InMemorySpanExporter, receiver: Receiver
) -> None:
    """During a rollout, the candidate's shadow run (in the worker's shadow process, which sets
    the SDK up from the same variables) is a span of a trace of its own, linked to the live
    job's span: the caller's trace holds the job, not the shadow run."""
    deployer.define_extension_point("shadowed")
    shop = shop_on(0, SHARDS, skip=6)
    deployer.deploy("shadowed", shop, guests.ECHO)
    deployer.start_rollout("shadowed", shop, guests.echo(burn=10), RolloutRules(promote_after=1000))
    outcome = client.run("shadowed", shop, {"n": 4}, timeout=5)
    assert outcome.ok and outcome.report is not None and outcome.report.rollout
    trace_id, _ = _ids(_call_span(host_spans, outcome.job_id))
    job = next(s for s in receiver.trace(trace_id) if s["name"] == SPAN.JOB)
    deadline = time.monotonic() + 20
    shadows: list[dict[str, Any]] = []
    while not shadows and time.monotonic() < deadline:
        time.sleep(0.05)
        with receiver.lock:
            shadows = [s for s in receiver.spans if s["name"] == SPAN.SHADOW and job["span_id"] in s["links"]]
    assert len(shadows) == 1, receiver.spans[-5:]
    shadow = shadows[0]
    assert shadow["trace_id"] != trace_id and shadow["parent_id"] == ""
    assert shadow["attributes"][ATTR.EP] == "shadowed" and shadow["attributes"][ATTR.SHADOW_RESULT] == "match"


def test_a_jobs_trace_context_is_checked_as_the_rest_of_it() -> None:
    """A job's ``trace`` is a small map of names to strings, or the job is refused; what the
    strings say is the propagator's business (a malformed ``traceparent`` is no parent). Its
    ``enqueued_at`` is a finite time, not before 1970."""
    base = Job("id", "ep", "shop", b"{}", deadline=2.0, enqueued_at=1.0).to_wire()
    assert Job.from_wire({**base, "trace": {"traceparent": "garbage"}}).trace == {"traceparent": "garbage"}
    for bad in ("00-ab", ["traceparent"], {"traceparent": 5}, {str(n): "x" for n in range(9)}, {"": "x"}):
        with pytest.raises(ValueError, match="trace context"):
            Job.from_wire({**base, "trace": bad})
    assert context_of({"traceparent": "garbage"}) is not None
    assert not trace.get_current_span(context_of({"traceparent": "garbage"})).get_span_context().is_valid
    assert context_of(None) is None and context_of({}) is None
    # The enqueue time the queue-wait span starts from is a real time, or the job is refused
    # (a negative start made the exporter refuse a whole batch of every shop's spans).
    for when in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="enqueued_at"):
            Job.from_wire({**base, "enqueued_at": when})


def test_a_prefork_pool_traces_in_its_children_each_set_up_after_its_fork(
    deployer: Registry,
    client: Client,
    host_spans: InMemorySpanExporter,
    pool_settings: Settings,
    receiver: Receiver,
) -> None:
    """With Celery's prefork pool, the parent (which runs no job) sets no tracing up; each child
    sets the SDK up after its fork, and its jobs' spans reach the collector under the callers'
    traces."""
    deployer.define_extension_point("forked")
    shop = shop_on(3, SHARDS)
    deployer.deploy("forked", shop, guests.ECHO)
    logfile = Path(tempfile.mkdtemp(prefix="scriptpool-worker-")) / "prefork.log"
    argv = worker_argv(pool_settings, [3], name="prefork@test", pool="prefork")
    env = {
        **worker_env(pool_settings),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    process = subprocess.Popen(
        [*argv, "--concurrency", "2", "--logfile", str(logfile)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while " ready." not in (logfile.read_text() if logfile.exists() else ""):
            assert process.poll() is None and time.monotonic() < deadline, logfile.read_text()[-3000:]
            time.sleep(0.05)
        outcomes = [client.run("forked", shop, {"n": n}, timeout=5) for n in range(6)]
        assert all(o.ok for o in outcomes), outcomes
        children = {pid_of(o.worker) for o in outcomes}
        assert process.pid not in children
        for outcome in outcomes:
            trace_id, call_id = _ids(_call_span(host_spans, outcome.job_id))
            job = next(s for s in receiver.trace(trace_id) if s["name"] == SPAN.JOB)
            assert job["parent_id"] == call_id and job["attributes"][ATTR.WORKER] == outcome.worker
        configured = [
            json.loads(line[line.index("{") :])["pid"]
            for line in logfile.read_text().splitlines()
            if '"tracing_configured"' in line
        ]
        assert children <= set(configured) and process.pid not in configured, (configured, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
