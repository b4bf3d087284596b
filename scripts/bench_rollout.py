"""What a verified rollout costs: live latency through one solo worker with shadowing off and at
R = 1.0 (a candidate as costly as the live C discount script), serial and from 4 threads; against
the naive design, where both versions run before the reply (a two-app join), and a bare Redis
request-reply floor. Capacity: the worker's CPU time per call, and the shadow runs it compared or
dropped.

Every mode runs for ``--rounds`` short rounds, the modes in turn (this machine drifts); each
figure is the median over the rounds, and ratios are to shadowing off in the same run.

Run: .venv/bin/python scripts/bench_rollout.py [--calls 400] [--rounds 5]
Starts a private Redis and one worker; prints one JSON object (ms, CPU ms per call, MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import wasmtime

from scriptpool.config import Settings
from scriptpool.engine import Sandbox
from scriptpool.producer import Client
from scriptpool.registry import ABORTED, Registry, RolloutRules
from scriptpool.testing import EmbeddedRedis, percentiles, rss_mb, worker_argv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_pool import floor  # noqa: E402

KEY = secrets.token_hex(32)  # random: a published key signs nothing
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


class Modes:
    """The ways a phase runs: what is deployed at the live shop, and a rollout beside it or not."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.serial = 0
        registry.define_extension_point("discount")
        registry.define_extension_point("naive", combine="join", reducer="first")
        registry.deploy("discount", "live", DISCOUNT)
        registry.deploy("naive", "live", DISCOUNT, app="a-live")
        registry.deploy("naive", "live", renamed(DISCOUNT, b"naive"), app="b-candidate")
        heavy = {"fuel": 1_000_000_000, "wall_ms": 2000}
        registry.define_extension_point("heavy", limits=heavy)
        registry.define_extension_point("heavy-naive", limits=heavy, combine="join", reducer="first")
        registry.deploy("heavy", "live", DONE)
        registry.deploy("heavy-naive", "live", DONE, app="a-live")
        registry.deploy("heavy-naive", "live", SLOW, app="b-candidate")

    def begin(self, mode: str) -> tuple[str, Any]:
        """Set ``mode`` up; the EP to call and its input."""
        family, _, variant = mode.partition(":")
        ep, payload = ("heavy", {}) if family == "slow" else ("discount", CART)
        if variant == "naive":
            return f"{ep}-naive" if family == "slow" else "naive", payload
        if variant.startswith("r"):
            self.serial += 1
            candidate = SLOW if family == "slow" else renamed(DISCOUNT, b"%d" % self.serial)
            rules = RolloutRules(shadow_rate=float(variant[1:]), promote_after=10_000_000)
            self.registry.start_rollout(ep, "live", candidate, rules)
            time.sleep(0.2)  # the worker hears of it
        return ep, payload

    def end(self, mode: str, figures: dict[str, Any]) -> None:
        family, _, variant = mode.partition(":")
        if variant.startswith("r"):
            ep = "heavy" if family == "slow" else "discount"
            figures["compared"] = int(self.registry.rollouts.status(ep, "live").counts["compared"])
            self.registry.rollouts.decide(ep, "live", ABORTED, "measured")


def summary(rounds: list[dict[str, Any]], baseline: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Medians over the rounds, and the p50/p95 ratios to the baseline's medians."""
    out: dict[str, Any] = {
        key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0] if key != "p99_ms"
    }
    if baseline is not None:
        for key in ("p50_ms", "p95_ms"):
            out[f"{key[:3]}_ratio"] = round(out[key] / statistics.median(r[key] for r in baseline), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=400, help="calls per phase")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every mode, in turn")
    args = parser.parse_args()
    result: dict[str, Any] = {}
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=KEY.encode(), shards=1)
        modes = Modes(Registry(redis.Redis.from_url(server.url), settings, Sandbox()))
        result["floor"] = floor(server.url, args.calls * 2)
        log = Path(tempfile.mkdtemp()) / "worker.log"
        argv = [*worker_argv(settings, [0], name="rollout-bench@%h"), "--logfile", str(log)]
        env = {**os.environ, **settings.to_env()}
        worker = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        plans = [
            (1, ["discount:off", "discount:r1.0", "discount:r0.1", "discount:naive"]),
            (4, ["discount:off", "discount:r1.0", "discount:r0.1", "discount:naive"]),
            (1, ["slow:off", "slow:r1.0", "slow:naive"]),
        ]
        try:
            with Client(settings) as client:
                deadline = time.monotonic() + 30
                while not client.run("discount", "live", CART, timeout=1).ok:
                    assert time.monotonic() < deadline, log.read_text()
                for threads, names in plans:
                    seen: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
                    for turn in range(args.rounds):
                        for name in names[turn % len(names) :] + names[: turn % len(names)]:
                            ep, payload = modes.begin(name)
                            calls = args.calls // 10 if name == "slow:naive" else args.calls
                            figures = phase(client, ep, "live", payload, calls, threads, worker.pid)
                            modes.end(name, figures)
                            seen[name].append(figures)
                    off = seen[names[0]]
                    for name, rounds in seen.items():
                        key = f"{name} threads={threads}"
                        result[key] = summary(rounds, off if rounds is not off else None)
                shadow = shadow_pid(worker.pid)
                result["rss_mb"] = {
                    "worker": rss_mb(worker.pid),
                    "shadow_process": rss_mb(shadow) if shadow else None,
                }
        finally:
            worker.terminate()
            worker.wait()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
