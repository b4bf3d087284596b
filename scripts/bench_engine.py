"""The runtime's in-process costs: hot execution (p50/p99), cold deserialize vs compile, worker extras.

Run: .venv/bin/python scripts/bench_engine.py [--runs 5000] [--baseline REF] [--profile]
Starts a private Redis; prints one JSON object.

``--baseline REF`` loads the executor's package (``runtime``, or ``workers`` before the runtime
had a layer of its own) of git revision REF (e.g. HEAD, before your uncommitted changes) under
another name into this same process and runs it against the same Redis, scripts and inputs,
interleaved with the current code in batches whose order alternates. Only that package is REF's:
``config``, ``engine`` and ``registry`` are today's for both; for a change to those, run the
bench in a ``git archive REF`` copy (``PYTHONPATH=COPY``) and alternate the two by hand.
Both variants see the same machine noise, so compare their medians and p99 with each other.
``--profile`` prints a cProfile breakdown of the current code's hot trivial path to stderr.
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import functools
import importlib
import io
import json
import logging
import os
import pstats
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scriptpool.config import Settings, configure_logging
from scriptpool.engine import Sandbox
from scriptpool.registry import Registry
from scriptpool.runtime import Executor
from scriptpool.testing import TRIVIAL_WAT, EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
TRIVIAL = bytes(wasmtime.wat2wasm(TRIVIAL_WAT))
BATCH = 250


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50": round(pct(samples, 0.5), 1),
        "p90": round(pct(samples, 0.9), 1),
        "p99": round(pct(samples, 0.99), 1),
    }


NOISE = "noise reference: pure-Python spin with current's median"


def spin_for(target_us: float) -> Callable[[], float]:
    """A sampler of a pure-Python loop calibrated to take ``target_us``: timed in the same
    interleaved batches, its tail is what this machine adds to anything of that length."""

    def spin(n: int) -> int:
        total = 0
        for i in range(n):
            total += i
        return total

    t = time.perf_counter()
    spin(100_000)
    per_iteration = (time.perf_counter() - t) / 100_000 * 1e6
    iterations = max(1, int(target_us / per_iteration))
    for _ in range(5):  # correct the estimate against the median of short runs
        trial = []
        for _ in range(51):
            t = time.perf_counter()
            spin(iterations)
            trial.append((time.perf_counter() - t) * 1e6)
        iterations = max(1, int(iterations * target_us / statistics.median(trial)))

    def sample() -> float:
        t = time.perf_counter()
        spin(iterations)
        return (time.perf_counter() - t) * 1e6

    return sample


def load_baseline(ref: str) -> Any:
    """Import the runtime package of git revision ``ref`` (one that has it) as
    ``baseline_runtime``, beside today's. It runs on today's engine, registry and config."""
    era_of_runtime = (
        subprocess.run(
            ["git", "cat-file", "-e", f"{ref}:runtime/__init__.py"], cwd=ROOT, capture_output=True
        ).returncode
        == 0
    )
    if not era_of_runtime:
        # Its workers import the top-level config/engine/registry of their day, whose names
        # today's core no longer has: run this script in a `git archive REF` copy instead.
        raise SystemExit(
            f"bench_engine: --baseline {ref}: that revision predates the runtime layer (and the one "
            "scriptpool namespace); run this bench in `git archive REF | tar -x -C COPY` with "
            "PYTHONPATH=COPY and alternate the two runs by hand"
        )
    folder, imported = "runtime", r"scriptpool\.runtime"
    listing = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", ref, "--", folder],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    target = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    for name in listing:
        if not name.endswith(".py"):
            continue
        text = subprocess.run(
            ["git", "show", f"{ref}:{name}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        # Imports and lazy-export tables name the package: point them at the renamed copy.
        text = re.sub(rf"(?<![\w.]){imported}(?=\.|\s+import)", f"baseline_{folder}", text)
        path = target / name.replace(folder, f"baseline_{folder}", 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    sys.path.insert(0, str(target))
    # The baseline's metrics (telemetry, capture, shadow runs) have the current ones' names, so
    # they are built without registering them (the bench never serves /metrics).
    from prometheus_client import REGISTRY

    register = REGISTRY.register
    REGISTRY.register = lambda collector: None  # type: ignore[method-assign]
    try:
        return importlib.import_module(f"baseline_{folder}")
    finally:
        REGISTRY.register = register  # type: ignore[method-assign]


def interleave(variants: dict[str, Callable[[], float]], runs: int) -> dict[str, list[float]]:
    """Run each variant ``runs`` times in batches, alternating the order of the batches."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for round_ in range(max(1, runs // BATCH)):
        for name in order if round_ % 2 == 0 else order[::-1]:
            sample = variants[name]
            samples[name].extend(sample() for _ in range(BATCH))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--baseline", metavar="REF", help="also run the runtime of git revision REF")
    parser.add_argument("--profile", action="store_true", help="cProfile the hot trivial path")
    args = parser.parse_args()
    discount = (ROOT / "examples/discount/discount.wasm").read_bytes()
    discount_input = json.loads((ROOT / "examples/discount/input.json").read_text())
    baseline = load_baseline(args.baseline) if args.baseline else None
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=secrets.token_hex(32).encode())
        sandbox = Sandbox()
        registry = Registry(redis.Redis.from_url(server.url), settings, sandbox)
        registry.define_extension_point("bench")
        registry.deploy("bench", "trivial", TRIVIAL)
        registry.deploy("bench", "discount", discount)
        executors: dict[str, Any] = {"current": Executor(registry, sandbox, settings)}
        if baseline is not None:
            # A baseline runtime runs on today's engine and registry.
            old_registry = Registry(redis.Redis.from_url(server.url), settings, sandbox)
            executors[f"baseline {args.baseline}"] = baseline.Executor(old_registry, sandbox, settings)
        out: dict[str, Any] = {"runs": args.runs, "variants": list(executors)}
        runs_of: dict[str, list[float]] = {}
        last: dict[str, Any] = {}
        for name, payload in (("trivial", {}), ("discount", discount_input)):

            def timed(executor: Any, key: str, shop: str = name, payload: Any = payload) -> float:
                t = time.perf_counter()
                result = executor.execute("bench", shop, payload)
                elapsed = (time.perf_counter() - t) * 1e6
                assert result.ok, result.error
                runs_of.setdefault(key, []).append(result.report.run_ms * 1000)
                last[key] = result
                return elapsed

            for executor in executors.values():
                for _ in range(200):
                    executor.execute("bench", name, payload)
            variants: dict[str, Callable[[], float]] = {
                key: functools.partial(timed, executor, key) for key, executor in executors.items()
            }
            if name == "trivial":
                warm = [timed(executors["current"], "current") for _ in range(500)]
                variants[NOISE] = spin_for(statistics.median(warm))
            runs_of.clear()
            samples = interleave(variants, args.runs)
            out[f"hot_{name}_us"] = {
                key: {**summary(samples[key]), "guest_run_p50": round(statistics.median(runs_of[key]), 1)}
                for key in executors
            }
            if NOISE in samples:
                out[f"hot_{name}_us"][NOISE] = summary(samples[NOISE])
        out["worker_extras_us"] = worker_extras(last, args.runs)
        if args.profile:
            profile(executors["current"])
        out["discount_cold_ms"] = cold(sandbox, registry, settings, discount)
        print(json.dumps(out, indent=2))


def worker_extras(last: dict[str, Any], runs: int) -> dict[str, Any]:
    """Per-execution costs a worker adds after ``execute``: ``Execution.to_wire()`` and
    ``telemetry.record_execution`` (metrics and the JSON log event, logged as a worker does:
    structlog through stdlib logging, here into /dev/null)."""
    from scriptpool.workers import _telemetry

    sink = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives for the process
    root = logging.getLogger()
    root.handlers[:] = [sink]
    root.setLevel(logging.INFO)
    configure_logging(json=True)
    execution = last["current"]
    context = {"job": "j" * 32, "shop": "trivial", "ep": "bench", "shard": 0, "worker": "w@host:1"}
    variants: dict[str, Callable[[], float]] = {}

    def cost(call: Callable[[], object]) -> Callable[[], float]:
        def sample() -> float:
            t = time.perf_counter()
            call()
            return (time.perf_counter() - t) * 1e6

        return sample

    variants["to_wire current"] = cost(execution.to_wire)
    variants["record_execution current"] = cost(lambda: _telemetry.record_execution(execution, **context))
    samples = interleave(variants, runs)
    return {name: summary(values) for name, values in samples.items()}


def profile(executor: Any) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5000):
        executor.execute("bench", "trivial", {})
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    print(text.getvalue(), file=sys.stderr)


def cold(sandbox: Sandbox, registry: Registry, settings: Settings, discount: bytes) -> dict[str, Any]:
    stack = settings.limits.stack_bytes
    sha = registry.binding("bench", "discount").sha256
    artifact = registry.verified_artifact(sha)
    assert artifact is not None
    deser, comp = [], []
    for _ in range(50):
        t = time.perf_counter()
        sandbox.deserialize(artifact, stack)
        deser.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        sandbox.compile(discount, stack)
        comp.append((time.perf_counter() - t) * 1e3)
    return {
        "deserialize_p50": round(statistics.median(deser), 3),
        "compile_p50": round(statistics.median(comp), 3),
        "ratio": round(statistics.median(comp) / statistics.median(deser), 1),
        "module_bytes": len(discount),
        "artifact_bytes": len(artifact),
    }


if __name__ == "__main__":
    main()
