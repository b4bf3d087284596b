"""In-process engine costs: hot trivial execution (p50/p99), cold deserialize vs compile.

Run: .venv/bin/python scripts/bench_engine.py [--runs 5000]
Starts a private Redis; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import redis
import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import EmbeddedRedis, Settings
from producer._bench import TRIVIAL_WAT
from registry import Registry
from workers import Executor, Sandbox

TRIVIAL = bytes(wasmtime.wat2wasm(TRIVIAL_WAT))


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5000)
    args = parser.parse_args()
    discount = (Path(__file__).resolve().parent.parent / "examples/discount/discount.wasm").read_bytes()
    discount_input = json.loads(
        (Path(__file__).resolve().parent.parent / "examples/discount/input.json").read_text()
    )
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=b"bench-key-0123456789abcdef")
        sandbox = Sandbox()
        registry = Registry(redis.Redis.from_url(server.url), settings, sandbox)
        registry.define_extension_point("bench")
        registry.deploy("bench", "trivial", TRIVIAL)
        registry.deploy("bench", "discount", discount)
        executor = Executor(registry, sandbox, settings)
        out: dict[str, object] = {}
        for name, payload in (("trivial", {}), ("discount", discount_input)):
            for _ in range(200):
                executor.execute("bench", name, payload)
            totals, runs = [], []
            for _ in range(args.runs):
                t = time.perf_counter()
                result = executor.execute("bench", name, payload)
                totals.append((time.perf_counter() - t) * 1e6)
                runs.append(result.report.run_ms * 1000)
                assert result.ok, result.error
            out[f"hot_{name}_us"] = {
                "p50": round(pct(totals, 0.5), 1),
                "p99": round(pct(totals, 0.99), 1),
                "guest_run_p50": round(statistics.median(runs), 1),
            }
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
        out["discount_cold_ms"] = {
            "deserialize_p50": round(statistics.median(deser), 3),
            "compile_p50": round(statistics.median(comp), 3),
            "ratio": round(statistics.median(comp) / statistics.median(deser), 1),
            "module_bytes": len(discount),
            "artifact_bytes": len(artifact),
        }
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
