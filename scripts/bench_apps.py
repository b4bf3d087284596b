"""Several apps' scripts in one call, end to end through one solo worker: joins of 1, 5 and 25
trivial scripts and of 5 C discount scripts, with the join's parts run one after another and on
threads; against the same scripts as N separate ``Client.run`` calls issued at once.

Run: .venv/bin/python scripts/bench_apps.py [--calls 300] [--threads 1,4]
Starts a private Redis and, per thread setting, one worker; prints one JSON object (ms).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import wasmtime

from scriptpool.config import Settings
from scriptpool.engine import Sandbox
from scriptpool.producer import Client, Outcome
from scriptpool.registry import Registry
from scriptpool.testing import EmbeddedRedis, percentiles, worker_argv

ROOT = Path(__file__).resolve().parent.parent
KEY = secrets.token_hex(32)  # random: a published key signs nothing
DISCOUNT = (ROOT / "examples" / "discount" / "discount.wasm").read_bytes()
CART = json.loads((ROOT / "examples" / "discount" / "input.json").read_text())


def trivial(app: str) -> bytes:
    """A script that ignores its input and prints one discount: the work is ours, not its."""
    raw = json.dumps({"discounts": [{"app": app}]})
    body = raw.replace('"', '\\"')
    return bytes(
        wasmtime.wat2wasm(
            f"""(module
          (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 64) "{body}")
          (func (export "_start")
            (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const {len(raw)}))
            (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""
        )
    )


def deploy(registry: Registry) -> dict[str, tuple[str, list[str], object]]:
    """EP -> (shop, the single-EP shops of the same scripts, input)."""
    plans: dict[str, tuple[str, list[str], object]] = {}
    registry.define_extension_point("single")
    for n, kind in ((1, "trivial"), (5, "trivial"), (25, "trivial"), (5, "discount")):
        ep = f"join{n}-{kind}"
        registry.define_extension_point(ep, combine="join", reducer="concat:discounts")
        singles = []
        for i in range(n):
            wasm = trivial(f"app-{i:02}") if kind == "trivial" else DISCOUNT
            registry.deploy(ep, "1", wasm, app=f"app-{i:02}")
            shop = f"{ep}.{i}"
            registry.deploy("single", shop, wasm)
            singles.append(shop)
        plans[ep] = ("1", singles, {} if kind == "trivial" else CART)
    return plans


def measure(client: Client, plans: dict[str, tuple[str, list[str], object]], calls: int) -> dict[str, object]:
    out: dict[str, object] = {}
    fanout = ThreadPoolExecutor(25)
    for ep, (shop, singles, payload) in plans.items():
        for _ in range(30):
            assert client.run(ep, shop, payload, timeout=5).ok
        joined: list[Outcome] = [client.run(ep, shop, payload, timeout=5) for _ in range(calls)]
        assert all(o.ok and len(o.parts) == len(singles) for o in joined), joined[-1]
        separate = []
        for _ in range(calls):
            started = time.perf_counter()
            outcomes = list(fanout.map(lambda s, p=payload: client.run("single", s, p, timeout=5), singles))
            separate.append((time.perf_counter() - started) * 1000)
            assert all(o.ok for o in outcomes)
        out[ep] = {
            "one_call_total": percentiles([o.timings.total_ms for o in joined]),
            "one_call_execute": percentiles([o.timings.execute_ms for o in joined]),
            "separate_calls_at_once": percentiles(separate),
        }
    fanout.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--threads", default="1,4")
    args = parser.parse_args()
    result: dict[str, object] = {}
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=KEY.encode(), shards=1)
        plans = deploy(Registry(redis.Redis.from_url(server.url), settings, Sandbox()))
        for threads in (int(t) for t in args.threads.split(",")):
            env = {**os.environ, **settings.to_env(), "SCRIPTPOOL_JOIN_THREADS": str(threads)}
            log = Path(tempfile.mkdtemp()) / "worker.log"
            argv = [*worker_argv(settings, [0], name=f"apps-{threads}@%h"), "--logfile", str(log)]
            worker = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                with Client(settings) as client:
                    deadline = time.monotonic() + 30
                    while not client.run("single", "join1-trivial.0", {}, timeout=1).ok:
                        assert time.monotonic() < deadline, log.read_text()
                    result[f"join_threads={threads}"] = measure(client, plans, args.calls)
            finally:
                worker.terminate()
                worker.wait()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
