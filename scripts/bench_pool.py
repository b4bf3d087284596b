"""Serial end-to-end latency through the pool, per Celery pool type, against a Redis floor.

Run: .venv/bin/python scripts/bench_pool.py [--calls 2000] [--pools solo,threads,prefork]
Starts a private Redis and one worker per pool type in turn; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scriptpool.config import Settings  # noqa: E402
from scriptpool.engine import Sandbox  # noqa: E402
from scriptpool.producer import Client  # noqa: E402
from scriptpool.registry import Registry  # noqa: E402
from scriptpool.testing import EmbeddedRedis, worker_argv  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_engine import TRIVIAL  # noqa: E402

KEY = secrets.token_hex(32)  # random: a published key signs nothing


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def floor(url: str, calls: int) -> dict[str, float]:
    """A bare request-reply through Redis: push a job, an echo thread pops it and pushes a reply."""
    stop = threading.Event()

    def echo() -> None:
        r = redis.Redis.from_url(url)
        while not stop.is_set():
            item = r.brpop(["floor:jobs"], timeout=1)
            if item:
                r.lpush(b"floor:reply:" + item[1], b"ok")

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    r = redis.Redis.from_url(url)
    samples = []
    for i in range(calls):
        token = str(i).encode()
        t = time.perf_counter()
        r.lpush("floor:jobs", token)
        r.brpop([b"floor:reply:" + token], timeout=5)
        samples.append((time.perf_counter() - t) * 1000)
    stop.set()
    return {"p50_ms": pct(samples, 0.5), "p95_ms": pct(samples, 0.95)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--pools", default="solo,threads,prefork")
    args = parser.parse_args()
    out: dict[str, object] = {}
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=KEY.encode(), shards=1)
        registry = Registry(redis.Redis.from_url(server.url), settings, Sandbox())
        registry.define_extension_point("bench")
        registry.deploy("bench", "1", TRIVIAL)
        out["floor"] = floor(server.url, args.calls)
        env = dict(
            os.environ,
            SCRIPTPOOL_REDIS_URL=server.url,
            SCRIPTPOOL_ARTIFACT_KEY=KEY,
            SCRIPTPOOL_SHARDS="1",
            PYTHONPATH=str(ROOT),
        )
        for pool in args.pools.split(","):
            log = Path(tempfile.mkdtemp()) / "worker.log"
            argv = worker_argv(settings, [0], name=f"bench-{pool}@%h", pool=pool)
            if pool != "solo":
                argv += ["--concurrency", "2"]
            proc = subprocess.Popen([*argv, "--logfile", str(log)], env=env, cwd=ROOT)
            with Client(settings) as client:
                deadline = time.monotonic() + 30
                while not client.run("bench", "1", {}, timeout=1).ok:
                    assert time.monotonic() < deadline, log.read_text()
                for _ in range(200):
                    client.run("bench", "1", {}, timeout=1)
                totals, stages = (
                    [],
                    {"enqueue_ms": [], "queue_wait_ms": [], "execute_ms": [], "result_ms": []},
                )
                for _ in range(args.calls):
                    outcome = client.run("bench", "1", {}, timeout=1)
                    assert outcome.ok, outcome
                    totals.append(outcome.timings.total_ms)
                    for name, values in stages.items():
                        values.append(getattr(outcome.timings, name))
                out[pool] = {
                    "p50_ms": pct(totals, 0.5),
                    "p95_ms": pct(totals, 0.95),
                    **{f"{k}_p50": pct(v, 0.5) for k, v in stages.items()},
                }
            proc.terminate()
            proc.wait()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
