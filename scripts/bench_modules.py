"""Cycling thousands of distinct modules through one warm worker: first-run latency and RSS.

Run: .venv/bin/python scripts/bench_modules.py [--modules 5000] [--cache-mb 32]

Starts a private Redis and one solo worker with a module cache of ``--cache-mb``, deploys
``--modules`` distinct modules (200 functions each, so each artifact is ~45 kB and compiles in
a few ms), then runs each once through the pool. Every run is the first of a freshly deployed
module on a warm worker, so it must deserialize the signed artifact and never compile. Prints
one JSON object: first-run latency (end to end and worker side), how each module was loaded,
the compile time it avoided, and the worker's RSS against the cache budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import redis
import structlog
import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scriptpool.engine import Sandbox
from scriptpool.producer import Client
from scriptpool.registry import Registry
from scriptpool.testing import local_pool, rss_mb


def distinct_module(i: int, functions: int = 200) -> bytes:
    """A valid WASI script printing ``{"m": i}``, padded with functions so it weighs like a real one."""
    body = "\n".join(
        f"(func $f{k} (param i32) (result i32) (local.get 0) (i32.const {i * 1000 + k}) (i32.mul)"
        f" (i32.const {k}) (i32.add) (local.get 0) (i32.xor))"
        for k in range(functions)
    )
    wat = f"""(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{{\\"m\\":{i:7d}}}")
  {body}
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const 13))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""
    return bytes(wasmtime.wat2wasm(wat))


def quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        name: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modules", type=int, default=5000)
    parser.add_argument("--cache-mb", type=int, default=32)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    os.environ["SCRIPTPOOL_MODULE_CACHE_MB"] = str(args.cache_mb)
    os.environ["SCRIPTPOOL_SHARDS"] = "1"
    with local_pool("bench-modules") as (settings, _env):
        registry = Registry(redis.Redis.from_url(settings.redis_url), settings, Sandbox())
        registry.define_extension_point("bench")
        deploy_ms, artifact_bytes = [], []
        for i in range(args.modules):
            started = time.perf_counter()
            deployment = registry.deploy("bench", f"m{i}", distinct_module(i))
            deploy_ms.append((time.perf_counter() - started) * 1000)
            if i % 500 == 0:
                artifact_bytes.append(len(registry.verified_artifact(deployment.sha256) or b""))
        compile_ms = []
        sandbox = Sandbox()
        for i in range(20):
            started = time.perf_counter()
            sandbox.compile(distinct_module(args.modules + i), settings.limits.stack_bytes)
            compile_ms.append((time.perf_counter() - started) * 1000)
        with Client(settings) as client:
            warm = client.run("bench", "m0", {}, timeout=5)
            assert warm.ok and warm.worker, warm
            pid = int(warm.worker.rsplit(":", 1)[1])
            for _ in range(200):  # a warm worker: imports done, allocator and caches settled
                client.run("bench", "m0", {}, timeout=5)
            rss = [rss_mb(pid)]
            total, execute, load_ms, sources = [], [], [], Counter()
            for i in range(1, args.modules):
                outcome = client.run("bench", f"m{i}", {}, timeout=5)
                assert outcome.ok and outcome.output == {"m": i} and outcome.report, outcome
                total.append(outcome.timings.total_ms)
                execute.append(outcome.timings.execute_ms)
                load_ms.append(outcome.report.lookup_ms)
                sources[outcome.report.module_source] += 1
                if i % 250 == 0:
                    rss.append(rss_mb(pid))
                    print(f"{i:>6} modules  worker RSS {rss[-1]:7.1f} MiB", file=sys.stderr)
            rss.append(rss_mb(pid))
    print(
        json.dumps(
            {
                "modules": args.modules,
                "module_cache_mb": args.cache_mb,
                "artifact_kb_median": round(statistics.median(artifact_bytes) / 1024, 1),
                "deploy_ms_median": round(statistics.median(deploy_ms), 2),
                "compile_ms_median": round(statistics.median(compile_ms), 2),
                "first_run_total_ms": quantiles(total),
                "first_run_execute_ms": quantiles(execute),
                "first_run_lookup_and_load_ms": quantiles(load_ms),
                "module_sources": dict(sources),
                "worker_rss_mb": {
                    "warm": round(rss[0], 1),
                    "peak": round(max(rss), 1),
                    "end": round(rss[-1], 1),
                    "growth": round(max(rss) - rss[0], 1),
                    "budget_plus_100": args.cache_mb + 100,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
