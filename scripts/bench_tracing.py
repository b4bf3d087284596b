"""What traces cost per call (README "Traces"): serial calls through a local pool with tracing
off and on, and, with ``--baseline REF``, off against the code of REF (the commit before).

Run: .venv/bin/python scripts/bench_tracing.py [--calls 2000] [--rounds 5] [--baseline REF]
Needs the otel extra (the test extra has it). Starts a private Redis and one worker per variant;
prints one JSON object.

Variants, each with a worker of its own (its own shard, so they never share a queue):

* ``off``: no tracer provider in the client, no ``OTEL_*`` variable for the worker: what a
  deployment without traces runs;
* ``on``: the client process has the SDK (``BatchSpanProcessor``, OTLP/HTTP exporter) and the
  worker the standard variables, both exporting to an OTLP/HTTP sink in this process (it answers
  200 and counts the spans), every call sampled;
* ``baseline`` (``--baseline REF``): off, on the code of REF (``git archive REF``, first on
  PYTHONPATH) for both the client and the worker.

Rounds alternate the variants (``--calls`` each, after a warm-up), so they share the machine's
noise; compare their medians and p99 with each other, not across runs. Each variant's client
runs in a child process (a tracer provider can be set once per process). ``micro`` is the
tracing work itself, in this process, per call: the client's span (open, inject, close) and the
worker's spans of a job (built from its report, handed to a batch processor whose exporter drops
them), in microseconds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
# The package this process imports: the checkout's, or (a baseline's child) REF's copy.
sys.path.insert(0, os.environ.get("BENCH_TRACING_PACKAGE") or str(ROOT))

from scriptpool.config import Settings, shard_for  # noqa: E402
from scriptpool.engine import Sandbox  # noqa: E402
from scriptpool.registry import Registry  # noqa: E402
from scriptpool.testing import EmbeddedRedis, worker_argv  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_engine import TRIVIAL  # noqa: E402

KEY = secrets.token_hex(32)  # random: a published key signs nothing
VARIANTS = ("off", "on", "baseline")
SHARDS = len(VARIANTS)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


class Sink:
    """An OTLP/HTTP endpoint that takes every export and counts the bytes and requests."""

    def __init__(self) -> None:
        self.requests = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                sink.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def child(variant: str, calls: int, warmup: int, shop: str, sink: str) -> None:
    """One round of one variant's calls, in this (child) process: prints each call's total."""
    from scriptpool.producer import Client

    if variant == "on":
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{sink}/v1/traces")))
        trace.set_tracer_provider(provider)
    settings = Settings.from_env()
    totals = []
    with Client(settings) as client:
        deadline = time.monotonic() + 60
        while not client.run("bench", shop, {}, timeout=1).ok:
            assert time.monotonic() < deadline, "the worker does not answer"
        for _ in range(warmup):
            client.run("bench", shop, {}, timeout=1)
        for _ in range(calls):
            outcome = client.run("bench", shop, {}, timeout=1)
            assert outcome.ok, outcome
            totals.append(outcome.timings.total_ms)
    print(json.dumps(totals))


def micro(runs: int) -> dict[str, float]:
    """The tracing work per call in this process, in µs: client span, worker spans."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from scriptpool.config.wire import Execution, ExecutionReport, Job
    from scriptpool.producer._calls import Call
    from scriptpool.producer._outcome import Outcome, Timings
    from scriptpool.producer._tracing import CallTracing, end_call
    from scriptpool.workers._tracing import JobTracing

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    tracer = provider.get_tracer("bench")
    client, worker = CallTracing(tracer), JobTracing(tracer)
    report = ExecutionReport(
        instructions=61, lookup_ms=0.02, instantiate_ms=0.05, run_ms=0.02, decode_ms=0.01
    )
    execution = Execution(True, {}, None, report)
    outcome = Outcome("ok", {}, timings=Timings(total_ms=1.0), shard=0, worker="w", job_id="j")
    client_us, worker_us = [], []
    for _ in range(runs):
        now = time.time()
        call = Call(Job("j", "bench", "1", b"{}", now + 1, now), 0, None, None, time.perf_counter())  # type: ignore[arg-type]
        t = time.perf_counter()
        client.start(call, "default")
        end_call(call, outcome)
        client_us.append((time.perf_counter() - t) * 1e6)
        t = time.perf_counter()
        job = call.job
        worker.executed(
            job,
            execution,
            0,
            "w",
            received=now,
            begun=now,
            finished=now + 0.001,
            pushed=now + 0.0011,
            replied=True,
        )
        worker_us.append((time.perf_counter() - t) * 1e6)
    provider.shutdown()
    return {
        "client_span_us_p50": round(statistics.median(client_us), 2),
        "worker_spans_us_p50": round(statistics.median(worker_us), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--baseline", metavar="REF", help="also run 'off' on the code of git revision REF")
    parser.add_argument("--micro-runs", type=int, default=20000)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--shop", help=argparse.SUPPRESS)
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.calls, args.warmup, args.shop, args.sink)
        return
    variants = [v for v in VARIANTS if v != "baseline" or args.baseline]
    out: dict[str, Any] = {"micro": micro(args.micro_runs)}
    sink = Sink()
    copy = None
    if args.baseline:
        copy = Path(tempfile.mkdtemp(prefix="scriptpool-baseline-"))
        archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(copy, filter="tar")
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=KEY.encode(), shards=SHARDS)
        registry = Registry(redis.Redis.from_url(server.url), settings, Sandbox())
        registry.define_extension_point("bench")
        shops = {}
        for n, variant in enumerate(VARIANTS):
            shops[variant] = next(str(i) for i in range(10_000) if shard_for(str(i), SHARDS) == n)
            registry.deploy("bench", shops[variant], TRIVIAL)
        base = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SCRIPTPOOL_", "OTEL_"))},
            "SCRIPTPOOL_REDIS_URL": server.url,
            "SCRIPTPOOL_ARTIFACT_KEY": KEY,
            "SCRIPTPOOL_SHARDS": str(SHARDS),
        }
        envs = {
            "off": {**base, "PYTHONPATH": str(ROOT)},
            "on": {
                **base,
                "PYTHONPATH": str(ROOT),
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url,
                "OTEL_SERVICE_NAME": "bench-worker",
            },
            "baseline": {**base, "PYTHONPATH": str(copy or ROOT)},
        }
        workers = []
        for variant in variants:
            log = Path(tempfile.mkdtemp()) / f"worker-{variant}.log"
            argv = worker_argv(settings, [VARIANTS.index(variant)], name=f"bench-{variant}@%h")
            cwd = copy if variant == "baseline" and copy else ROOT
            workers.append(subprocess.Popen([*argv, "--logfile", str(log)], env=envs[variant], cwd=cwd))
        try:
            totals: dict[str, list[float]] = {v: [] for v in variants}
            for round_ in range(args.rounds):
                order = variants if round_ % 2 == 0 else variants[::-1]
                for variant in order:
                    # This script in every child; a baseline's imports REF's package.
                    argv = [__file__, "--child", "off" if variant == "baseline" else variant]
                    argv += ["--calls", str(args.calls), "--warmup", str(args.warmup)]
                    argv += ["--shop", shops[variant], "--sink", sink.url]
                    env = dict(envs[variant])
                    if variant == "baseline" and copy:
                        env["BENCH_TRACING_PACKAGE"] = str(copy)
                    done = subprocess.run(
                        [sys.executable, *argv], env=env, capture_output=True, text=True, check=True
                    )
                    totals[variant].extend(json.loads(done.stdout.strip().splitlines()[-1]))
            for variant in variants:
                samples = totals[variant]
                out[variant] = {
                    "calls": len(samples),
                    "p50_ms": pct(samples, 0.5),
                    "p99_ms": pct(samples, 0.99),
                }
            out["on_minus_off_p50_ms"] = round(out["on"]["p50_ms"] - out["off"]["p50_ms"], 4)
            if "baseline" in out:
                out["off_minus_baseline_p50_ms"] = round(out["off"]["p50_ms"] - out["baseline"]["p50_ms"], 4)
            out["otlp_exports_received"] = sink.requests
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(timeout=30)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
