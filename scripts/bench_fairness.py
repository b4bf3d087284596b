"""A noisy neighbour on one shard: shop A floods it, shop B calls 20 times a second with a 50 ms
deadline. B's figures alone, next to A's flood with the worker of another revision (before fair
share: first come, first served) and with this tree's; A's throughput and refusals; the shard's
total throughput; and what fairness costs a quiet caller on the serial path.

Run: .venv/bin/python scripts/bench_fairness.py [--seconds 10] [--baseline 7edc9b1] [--serial 2000]

A private Redis, one solo worker on the one shard (the same for both revisions: clients are this
tree's, the worker the revision's, started from ``git archive`` of it). A's callers run in
closed loop with a 100 ms deadline; breakers are off for both shops. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import wasmtime

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scriptpool import BreakerPolicy, Client, Outcome, Registry, Settings  # noqa: E402
from scriptpool.engine import Sandbox  # noqa: E402
from scriptpool.testing import EmbeddedRedis, worker_argv  # noqa: E402

KEY = secrets.token_hex(32)  # random: a published key signs nothing
DISCOUNT = (ROOT / "examples" / "discount" / "discount.wasm").read_bytes()
DISCOUNT_INPUT = json.loads((ROOT / "examples" / "discount" / "input.json").read_text())
# About 53M instructions (seven a turn of its loop), at an EP that allows 60M: a script near its
# instruction limit that holds the worker about 10 ms here (the default 11M run in about 2 ms).
NEAR_LIMIT = bytes(
    wasmtime.wat2wasm("""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{}")
  (func (export "_start") (local $i i32)
    (loop $count
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $count (i32.lt_u (local.get $i) (i32.const 7500000))))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 2))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
""")
)
A, B = "shop-a", "shop-b"
B_RATE, B_TIMEOUT, A_CALLERS, A_TIMEOUT = 20, 0.050, 8, 0.100
# Breakers off: A's timeouts would open A's and stop the flood; B's would hide its misses.
UNBROKEN = BreakerPolicy(error_threshold=10**9)


def pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def worker_tree(revision: str) -> Path:
    """The revision's files (``git archive``) in a temporary folder, for its worker."""
    where = Path(tempfile.mkdtemp(prefix="scriptpool-baseline-"))
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as tmp:
        tmp.write(archive)
        tmp.seek(0)
        with tarfile.open(fileobj=tmp) as tar:
            tar.extractall(where, filter="tar")
    return where


class Worker:
    """One solo worker on shard 0, running the code under ``tree``."""

    def __init__(self, settings: Settings, tree: Path, name: str) -> None:
        self.log = Path(tempfile.mkdtemp()) / "worker.log"
        env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(tree)}
        argv = worker_argv(settings, [0], name=f"{name}@%h", pool="solo")
        self.process = subprocess.Popen([*argv, "--logfile", str(self.log)], env=env, cwd=tree)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def quiet_shop(client: Client, seconds: float) -> list[Outcome]:
    """B: a call every 1/20 s for ``seconds``, each on its own thread (a late one does not delay
    the next)."""
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = []
        start = time.monotonic()
        for n in range(int(seconds * B_RATE)):
            time.sleep(max(0.0, start + n / B_RATE - time.monotonic()))
            futures.append(pool.submit(client.run, "bench", B, DISCOUNT_INPUT, timeout=B_TIMEOUT))
        outcomes = [f.result() for f in futures]
    return outcomes


def flooding_shop(
    client: Client, ep: str, stop: threading.Event
) -> tuple[list[threading.Thread], list[Outcome]]:
    """A: eight callers in closed loop until ``stop``."""
    outcomes: list[Outcome] = []

    def caller() -> None:
        while not stop.is_set():
            outcomes.append(client.run(ep, A, DISCOUNT_INPUT, timeout=A_TIMEOUT))

    threads = [threading.Thread(target=caller) for _ in range(A_CALLERS)]
    for thread in threads:
        thread.start()
    return threads, outcomes


def b_figures(outcomes: list[Outcome]) -> dict[str, Any]:
    ok = [o.timings.total_ms for o in outcomes if o.ok]
    return {
        "calls": len(outcomes),
        "ok_rate": round(len(ok) / len(outcomes), 4) if outcomes else None,
        "p50_ms": pct(ok, 0.5),
        "p95_ms": pct(ok, 0.95),
        "p95_all_ms": pct([o.timings.total_ms for o in outcomes], 0.95),
        "errors": sorted({o.error_code for o in outcomes if not o.ok and o.error_code}),
    }


def scenario(settings: Settings, a_ep: str | None, seconds: float) -> dict[str, Any]:
    with Client(settings, breaker=UNBROKEN) as quiet, Client(settings, breaker=UNBROKEN) as noisy:
        for client, ep, shop in ((quiet, "bench", B), (noisy, a_ep or "bench", A)):  # hot before the clock
            for _ in range(20):
                client.run(ep, shop, DISCOUNT_INPUT, timeout=5)
        stop = threading.Event()
        threads, a_outcomes = flooding_shop(noisy, a_ep, stop) if a_ep is not None else ([], [])
        started = time.monotonic()
        time.sleep(0.5 if a_ep is not None else 0)  # the flood under way
        b_outcomes = quiet_shop(quiet, seconds)
        stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    out: dict[str, Any] = {"b": b_figures(b_outcomes)}
    if a_ep is not None:
        a_ok = sum(1 for o in a_outcomes if o.ok)
        out["a"] = {
            "calls": len(a_outcomes),
            "ok_per_s": round(a_ok / elapsed, 1),
            "quota_exceeded": sum(1 for o in a_outcomes if o.error_code == "quota_exceeded"),
            "timeout": sum(1 for o in a_outcomes if o.error_code == "timeout"),
            "errors": sorted({o.error_code for o in a_outcomes if not o.ok and o.error_code}),
        }
        out["shard_ok_per_s"] = round((a_ok + sum(1 for o in b_outcomes if o.ok)) / elapsed, 1)
    return out


def cpu_seconds(pid: int) -> float:
    """User and system CPU time ``pid`` has used (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serial(settings: Settings, calls: int, worker_pid: int) -> dict[str, Any]:
    """B alone, one caller in closed loop: the quiet caller's serial path, and the worker's CPU
    time per call (less at the mercy of the machine's other load than latency is)."""
    with Client(settings) as client:
        for _ in range(200):
            client.run("bench", B, DISCOUNT_INPUT, timeout=1)
        samples = []
        cpu_before = cpu_seconds(worker_pid)
        stages: dict[str, list[float]] = {
            name: [] for name in ("enqueue_ms", "queue_wait_ms", "execute_ms", "result_ms")
        }
        for _ in range(calls):
            outcome = client.run("bench", B, DISCOUNT_INPUT, timeout=1)
            assert outcome.ok, outcome
            samples.append(outcome.timings.total_ms)
            for name, values in stages.items():
                values.append(getattr(outcome.timings, name))
        cpu = cpu_seconds(worker_pid) - cpu_before
    return {
        "p50_ms": pct(samples, 0.5),
        "p95_ms": pct(samples, 0.95),
        "worker_cpu_us_per_call": round(cpu / calls * 1e6, 1),
        **{f"{name}_p50": pct(values, 0.5) for name, values in stages.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--baseline", default="7edc9b1", help="the revision whose worker is first come, first served"
    )
    parser.add_argument("--serial", type=int, default=2000, help="calls of the serial comparison (0: none)")
    parser.add_argument("--only", default="", help="comma-separated scenarios to run (default: all)")
    args = parser.parse_args()
    trees = {"baseline": worker_tree(args.baseline), "fair": ROOT}
    out: dict[str, Any] = {"baseline": args.baseline, "seconds": args.seconds}
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=KEY.encode(), shards=1)
        registry = Registry(redis.Redis.from_url(server.url), settings, Sandbox())
        registry.define_extension_point("bench")
        registry.define_extension_point("heavy", limits={"fuel": 60_000_000})
        registry.deploy("bench", B, DISCOUNT)
        registry.deploy("bench", A, DISCOUNT)
        registry.deploy("heavy", A, NEAR_LIMIT)
        for label, tree in trees.items():
            worker = Worker(settings, tree, label)
            try:
                with Client(settings) as client:
                    deadline = time.monotonic() + 60
                    while not client.run("bench", B, DISCOUNT_INPUT, timeout=1).ok:
                        assert time.monotonic() < deadline, worker.log.read_text()[-2000:]
                scenarios = {"b_alone": None, "a_floods": "bench", "a_floods_near_limit": "heavy"}
                only = set(args.only.split(",")) if args.only else set(scenarios)
                out[label] = {
                    name: scenario(settings, a_ep, args.seconds)
                    for name, a_ep in scenarios.items()
                    if name in only
                }
                if args.serial:
                    out[label]["serial_quiet"] = serial(settings, args.serial, worker.process.pid)
            finally:
                worker.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
