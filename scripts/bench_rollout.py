"""What a verified rollout costs: live latency through one solo worker with shadowing off and at
R = 1.0 (a candidate as costly as the live C discount script), serial and from 4 threads; against
the naive design, where both versions run before the reply (a two-app join), and a bare Redis
request-reply floor. Capacity: the worker's CPU time per call, and the shadow runs it compared or
dropped.

Run: .venv/bin/python scripts/bench_rollout.py [--calls 1000]
Starts a private Redis and one worker; prints one JSON object (ms, CPU ms per call).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import wasmtime

from config import Settings
from engine import Sandbox
from producer import Client
from registry import ABORTED, Registry, RolloutRules
from scriptpool import EmbeddedRedis, percentiles
from scriptpool._pool_commands import worker_argv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_pool import floor  # noqa: E402

KEY = "bench-key-0123456789abcdef"
DISCOUNT = (ROOT / "examples" / "discount" / "discount.wasm").read_bytes()
CART = json.loads((ROOT / "examples" / "discount" / "input.json").read_text())
# Counts to 40 million (tens of ms), then prints {"done":true}; and a script printing it at once.
SLOW = bytes(wasmtime.wat2wasm((ROOT / "examples" / "slow" / "slow.wat").read_text()))
DONE_WAT = r"""(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{\"done\":true}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const 13))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""
DONE = bytes(wasmtime.wat2wasm(DONE_WAT))


def renamed(wasm: bytes, tag: bytes) -> bytes:
    """The same module with a custom section added: another sha256, the same code and output."""
    name = b"scriptpool-bench"
    body = bytes([len(name)]) + name + tag
    return wasm + b"\x00" + bytes([len(body)]) + body


def cpu_ms(pid: int) -> float:
    """User + system CPU time of a process so far, in ms, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def shadow_pid(worker: int) -> int | None:
    """The worker's shadow process, once it has one."""
    for task in Path(f"/proc/{worker}/task").iterdir():
        for child in (task / "children").read_text().split():
            if "_shadow_process" in Path(f"/proc/{child}/cmdline").read_text():
                return int(child)
    return None


def phase(
    client: Client, ep: str, shop: str, payload: Any, calls: int, threads: int, pid: int
) -> dict[str, Any]:
    """``calls`` calls from ``threads`` closed-loop threads: latency, throughput, worker CPU."""

    def one(_: int) -> float:
        started = time.perf_counter()
        outcome = client.run(ep, shop, payload, timeout=5)
        assert outcome.ok, outcome.error
        return (time.perf_counter() - started) * 1000

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(50)))  # warm
        time.sleep(0.5)  # the warm-up's shadow runs finish
        shadow = shadow_pid(pid)
        cpu_before, started = cpu_ms(pid), time.perf_counter()
        shadow_before = cpu_ms(shadow) if shadow else 0.0
        samples = list(pool.map(one, range(calls)))
        wall = time.perf_counter() - started
    time.sleep(0.5)  # this phase's shadow runs finish before the CPU is read
    return {
        **{f"{k}_ms": v for k, v in percentiles(samples).items()},
        "calls_per_s": round(calls / wall),
        "worker_cpu_ms_per_call": round((cpu_ms(pid) - cpu_before) / calls, 3),
        "shadow_cpu_ms_per_call": round((cpu_ms(shadow) - shadow_before) / calls, 3) if shadow else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    result: dict[str, Any] = {}
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=KEY.encode(), shards=1)
        registry = Registry(redis.Redis.from_url(server.url), settings, Sandbox())
        registry.define_extension_point("discount")
        registry.define_extension_point("naive", combine="join", reducer="first")
        registry.deploy("discount", "live", DISCOUNT)
        registry.deploy("naive", "live", DISCOUNT, app="a-live")
        registry.deploy("naive", "live", renamed(DISCOUNT, b"naive"), app="b-candidate")
        result["floor"] = floor(server.url, args.calls)
        log = Path(tempfile.mkdtemp()) / "worker.log"
        argv = [*worker_argv(settings, [0], name="rollout-bench@%h"), "--logfile", str(log)]
        worker = subprocess.Popen(
            argv,
            env={**os.environ, **settings.to_env()},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with Client(settings) as client:
                deadline = time.monotonic() + 30
                while not client.run("discount", "live", CART, timeout=1).ok:
                    assert time.monotonic() < deadline, log.read_text()
                for threads in (1, 4):
                    runs: dict[str, Any] = {}
                    runs["shadowing_off"] = phase(
                        client, "discount", "live", CART, args.calls, threads, worker.pid
                    )
                    rules = RolloutRules(shadow_rate=1.0, promote_after=10_000_000)
                    registry.start_rollout("discount", "live", renamed(DISCOUNT, b"%d" % threads), rules)
                    time.sleep(0.2)  # the workers hear of it
                    runs["shadowing_r1"] = phase(
                        client, "discount", "live", CART, args.calls, threads, worker.pid
                    )
                    status = registry.rollouts.status("discount", "live")
                    registry.rollouts.decide("discount", "live", ABORTED, "measured")
                    runs["shadowing_r1"]["compared"] = int(status.counts["compared"])
                    runs["shadowing_r1"]["mismatch"] = int(status.counts["mismatch"])
                    rules = RolloutRules(shadow_rate=0.1, promote_after=10_000_000)
                    registry.start_rollout("discount", "live", renamed(DISCOUNT, b"r%d" % threads), rules)
                    time.sleep(0.2)
                    runs["shadowing_r0.1"] = phase(
                        client, "discount", "live", CART, args.calls, threads, worker.pid
                    )
                    runs["shadowing_r0.1"]["compared"] = int(
                        registry.rollouts.status("discount", "live").counts["compared"]
                    )
                    registry.rollouts.decide("discount", "live", ABORTED, "measured")
                    runs["naive_inline"] = phase(
                        client, "naive", "live", CART, args.calls, threads, worker.pid
                    )
                    result[f"threads={threads}"] = runs
                # A slow candidate (examples/slow, tens of ms a run): most shadow runs are dropped.
                registry.define_extension_point("heavy", limits={"fuel": 1_000_000_000, "wall_ms": 2000})
                registry.deploy("heavy", "live", DONE)
                registry.define_extension_point(
                    "heavy-naive",
                    limits={"fuel": 1_000_000_000, "wall_ms": 2000},
                    combine="join",
                    reducer="first",
                )
                registry.deploy("heavy-naive", "live", DONE, app="a-live")
                registry.deploy("heavy-naive", "live", SLOW, app="b-candidate")
                heavy: dict[str, Any] = {"off": phase(client, "heavy", "live", {}, args.calls, 1, worker.pid)}
                registry.start_rollout("heavy", "live", SLOW, RolloutRules(promote_after=10_000_000))
                time.sleep(0.2)
                heavy["r1"] = phase(client, "heavy", "live", {}, args.calls, 1, worker.pid)
                heavy["r1"]["compared"] = int(registry.rollouts.status("heavy", "live").counts["compared"])
                registry.rollouts.decide("heavy", "live", ABORTED, "measured")
                heavy["naive_inline"] = phase(
                    client, "heavy-naive", "live", {}, args.calls // 10, 1, worker.pid
                )
                result["slow_candidate_serial"] = heavy
        finally:
            worker.terminate()
            worker.wait()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
