"""Script data writes a shard sustains: one solo worker, runs each writing one SESSION key.

Run: .venv/bin/python scripts/bench_store_writes.py [--calls 2000] [--callers 32] [--rounds 3]
Prints one JSON object.

A private Redis and one worker (solo pool, one shard). ``--callers`` threads call at once, each
with its own session tokens (buyers), until ``--calls`` runs are done; a round ends when the
last write has landed (every session the runs named exists in the shop's session index). Two
scripts, interleaved round by round so they see the same machine noise: ``writes`` prints
``{"ok":1,"storeWrites":[{"scope":"SESSION","key":"viewed","value":1}]}``, ``plain`` prints
``{"ok":1}`` (the same work without the write). Medians over the rounds:

- ``writes_per_s``: runs (each one write) per second, from the first call to the last write
  applied; ``plain_runs_per_s``: the same for runs that write nothing;
- ``apply_us``: what the worker spends on a run's write after its reply, estimated as the
  difference of the two per-run times (1 / rate), single worker so the rates are its own.
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

ROOT = Path(__file__).resolve().parent.parent
WRITES = b'{"ok":1,"storeWrites":[{"scope":"SESSION","key":"viewed","value":1}]}'
PLAIN = b'{"ok":1}'


def constant(stdout: bytes) -> bytes:
    """A module that prints ``stdout`` and nothing else."""
    import wasmtime

    escaped = "".join(f"\\{b:02x}" for b in stdout)
    return bytes(
        wasmtime.wat2wasm(f"""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{escaped}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const {len(stdout)}))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
""")
    )


def main() -> None:
    """Measure and print the JSON object the module doc describes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import redis

    sys.path.insert(0, str(ROOT))
    from scriptpool.config import Settings
    from scriptpool.engine import Sandbox
    from scriptpool.producer import Client
    from scriptpool.registry import Registry
    from scriptpool.testing import EmbeddedRedis, worker_argv

    key = secrets.token_hex(32)
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=key.encode(), shards=1)
        db = redis.Redis.from_url(server.url)
        registry = Registry(db, settings, Sandbox())
        for ep, stdout in (("writes", WRITES), ("plain", PLAIN)):
            registry.define_extension_point(ep)
            registry.deploy(ep, "1", constant(stdout))
        env = dict(
            os.environ, SCRIPTPOOL_REDIS_URL=server.url, SCRIPTPOOL_ARTIFACT_KEY=key, SCRIPTPOOL_SHARDS="1"
        )
        env["PYTHONPATH"] = str(ROOT)
        log = Path(tempfile.mkdtemp()) / "worker.log"
        argv = worker_argv(settings, [0], name="bench-writes@%h", pool="solo")
        proc = subprocess.Popen([*argv, "--logfile", str(log)], env=env, cwd=ROOT)
        rates: dict[str, list[float]] = {"writes": [], "plain": []}
        try:
            with Client(settings) as client:
                deadline = time.monotonic() + 30
                while not client.run("plain", "1", {}, timeout=1).ok:
                    assert time.monotonic() < deadline, log.read_text()
                sessions = settings.keys.data_sessions("1")
                for r in range(args.rounds):
                    for ep in ("writes", "plain"):
                        db.delete(sessions)

                        def one(i: int, ep: str = ep, r: int = r) -> bool:
                            outcome = client.run(ep, "1", {}, timeout=30, session=f"buyer-{r}-{i}")
                            return outcome.ok

                        started = time.perf_counter()
                        with ThreadPoolExecutor(args.callers) as pool:
                            assert all(pool.map(one, range(args.calls)))
                        if ep == "writes":  # until the last write has landed
                            while db.zcard(sessions) < args.calls:
                                time.sleep(0.001)
                        rates[ep].append(args.calls / (time.perf_counter() - started))
        finally:
            proc.terminate()
            proc.wait(10)
    writes, plain = statistics.median(rates["writes"]), statistics.median(rates["plain"])
    result: dict[str, Any] = {
        "calls": args.calls,
        "callers": args.callers,
        "rounds": args.rounds,
        "writes_per_s": round(writes),
        "plain_runs_per_s": round(plain),
        "apply_us": round((1 / writes - 1 / plain) * 1e6, 1),
        "all_writes_per_s": [round(x) for x in rates["writes"]],
        "all_plain_per_s": [round(x) for x in rates["plain"]],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
