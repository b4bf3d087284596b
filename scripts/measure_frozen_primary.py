"""What a frozen-then-resumed Sentinel primary does to callers, the worker and invalidations.

Run: .venv/bin/python scripts/measure_frozen_primary.py [--freeze-s 10] [--down-after-ms 1000]

Starts a private Sentinel set (3 sentinels, a primary, a replica), one solo worker and a Client
calling one shop at --rate per second (deadline --deadline-ms). At T0 the primary is SIGSTOPped for
--freeze-s seconds, then SIGCONTed: it comes back still claiming to be master until the sentinels
convert it. As soon as the sentinels name the new primary a second version is deployed there.
Binding caches are kept for 60 s, so only the invalidation (pub/sub) tells the worker of it.
Prints, in seconds after T0: the switch, the first ok answer, the first answer of the new version,
the conversion of the old primary, and how late the latest caller was answered past its deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scriptpool.config import Settings  # noqa: E402
from scriptpool.producer import BreakerPolicy, Client  # noqa: E402
from scriptpool.registry import Registries  # noqa: E402
from scriptpool.testing import EmbeddedSentinelSet, worker_argv  # noqa: E402

KEY = secrets.token_hex(32).encode()  # random: a published key signs nothing


def writes(text: str) -> bytes:
    """A module that prints ``text`` and returns (compiled from WAT)."""
    import wasmtime

    data = text.encode()
    escaped = "".join(f"\\{b:02x}" for b in data)
    wat = f"""
    (module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 16) "{escaped}")
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 16))
        (i32.store (i32.const 4) (i32.const {len(data)}))
        (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
    """
    return bytes(wasmtime.wat2wasm(wat))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--freeze-s", type=float, default=10.0)
    parser.add_argument("--down-after-ms", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--deadline-ms", type=float, default=300.0)
    parser.add_argument("--observe-s", type=float, default=25.0)
    args = parser.parse_args()
    with EmbeddedSentinelSet(down_after_ms=args.down_after_ms) as sentinels:
        settings = Settings(
            redis_url=sentinels.url,
            artifact_key=KEY,
            shards=1,
            binding_cache_ttl_s=60.0,
            deploy_replicas=0,  # after the failover the new primary has no replica to wait for
        )
        registries = Registries(settings)
        registries.everywhere(lambda r: r.define_extension_point("t"), what="t", again="again")
        with registries.on_shop("1", what="v1", again="again") as registry:
            registry.deploy("t", "1", writes('{"v": 1}'))
        v2 = writes('{"v": 2}')
        env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)}
        log = Path(sentinels.dir) / "worker.log"
        argv = [*worker_argv(settings, [0], name="frozen@test"), "--logfile", str(log)]
        worker = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 30
            while " ready." not in (log.read_text() if log.exists() else ""):
                assert time.monotonic() < deadline and worker.poll() is None, "worker did not start"
                time.sleep(0.05)
            results: list[tuple[float, float, str, object]] = []
            late: list[object] = []  # callers answered more than 50 ms past their deadline
            mark = {"t0": 0.0}
            stop = threading.Event()
            with Client(settings, breaker=BreakerPolicy(error_threshold=10**9)) as client:

                def call() -> None:
                    n = 0
                    began = time.monotonic()
                    while not stop.is_set():
                        n += 1
                        stop.wait(max(0.0, began + n / args.rate - time.monotonic()))
                        started = time.monotonic()
                        outcome = client.run("t", "1", {}, timeout=args.deadline_ms / 1000, fallback=None)
                        results.append((started, time.monotonic(), outcome.status, outcome.output))
                        if (time.monotonic() - started) * 1000 > args.deadline_ms + 50:
                            late.append((round(started - mark["t0"], 2), outcome.error, outcome.timings))

                threads = [threading.Thread(target=call, daemon=True) for _ in range(2)]
                for thread in threads:
                    thread.start()
                time.sleep(2.0)
                old = sentinels.primary_port()
                t0 = mark["t0"] = time.monotonic()
                sentinels.freeze(old)
                new = sentinels.wait_for_new_primary(old, timeout_s=60)
                switch = time.monotonic() - t0
                with registries.on_shop("1", what="v2", again="again") as registry:
                    registry.deploy("t", "1", v2)
                deployed = time.monotonic() - t0
                remaining = args.freeze_s - (time.monotonic() - t0)
                if remaining > 0:
                    time.sleep(remaining)
                sentinels.thaw(old)
                thawed = time.monotonic() - t0
                converted = None
                with sentinels.data_client(old) as zombie:
                    while time.monotonic() - t0 < args.observe_s:
                        try:
                            if converted is None and zombie.info("replication")["role"] == "slave":
                                converted = time.monotonic() - t0
                        except redis.RedisError:
                            pass  # it may refuse while it resyncs
                        time.sleep(0.05)
                stop.set()
                for thread in threads:
                    thread.join(5)
        finally:
            worker.terminate()
            worker.wait(10)
    after = [(s - t0, f - t0, st, out) for s, f, st, out in results if s >= t0]
    first_ok = next((f for s, f, st, _ in after if st == "ok"), None)
    first_v2 = next((f for s, f, st, out in after if st == "ok" and out == {"v": 2}), None)
    stale_after_deploy = sum(1 for s, f, st, out in after if st == "ok" and out == {"v": 1} and s > deployed)
    worst = max((f - s) * 1000 - args.deadline_ms for s, f, _, _ in after)
    for entry in late:
        print("late:", entry)
    print(
        json.dumps(
            {
                "freeze_s": args.freeze_s,
                "down_after_ms": args.down_after_ms,
                "switch_s": round(switch, 2),
                "v2_deployed_on_new_primary_s": round(deployed, 2),
                "thawed_s": round(thawed, 2),
                "old_primary_converted_s": None if converted is None else round(converted, 2),
                "first_ok_s": None if first_ok is None else round(first_ok, 2),
                "first_v2_answer_s": None if first_v2 is None else round(first_v2, 2),
                "v1_answers_after_v2_deployed": stale_after_deploy,
                "worst_answer_past_deadline_ms": round(worst, 1),
                "calls": len(after),
                "fallbacks": sum(1 for _, _, st, _ in after if st != "ok"),
                "new_primary": new,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
