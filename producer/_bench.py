"""``scriptpool bench``: the report's stage table for our pool, against the floor, the in-process
engine and naive Celery, all measured in one run on the same script and input."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis

from config import shard_for
from producer._client import Client
from producer._local_pool import local_pool
from producer._outcome import Outcome
from producer._table import LiveTable

# A trivial script: ignores its input and prints {}. The work is ours, not the guest's.
TRIVIAL_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const 2))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""
PAYLOAD = {"cart": {"lines": [{"id": f"gid://shopify/CartLine/{i}", "quantity": i} for i in range(1, 6)]}}
STAGES = ["lookup", "validate", "serialize", "enqueue", "queue_wait", "execute", "result", "total"]


@dataclass(frozen=True)
class BenchOptions:
    """What ``scriptpool bench`` was asked to do."""

    n: int = 2000
    concurrency: int = 4
    shards: int = 2
    serial: int = 1000
    references: int = 500
    external: bool = False
    json_path: str | None = None


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self._lock = threading.Lock()
        self._last = -1

    def step(self) -> None:
        with self._lock:
            self.done += 1
            if not sys.stderr.isatty():  # in a log, one line per phase is enough
                if self.done == self.total:
                    print(f"  {self.label:<22} {self.total} done", file=sys.stderr, flush=True)
                return
            filled = 30 * self.done // self.total
            if filled != self._last or self.done == self.total:
                self._last = filled
                bar = "#" * filled + "." * (30 - filled)
                end = "\n" if self.done == self.total else ""
                print(
                    f"\r  {self.label:<22} [{bar}] {self.done}/{self.total}",
                    end=end,
                    file=sys.stderr,
                    flush=True,
                )


def _timed(label: str, count: int, call: Callable[[], Any]) -> list[float]:
    progress = Progress(label, count)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
        progress.step()
    return samples


def measure_floor(url: str, count: int) -> list[float]:
    """Push a job and block on a reply list, answered by an echo thread: the least a Redis
    request-reply can cost from Python."""
    stop = threading.Event()
    worker = redis.Redis.from_url(url)

    def echo() -> None:
        while not stop.is_set():
            item = worker.brpop(["bench:floor:jobs"], timeout=1)
            if item:
                worker.lpush(b"bench:floor:reply:" + cast(bytes, item[1]), b"{}")

    threading.Thread(target=echo, daemon=True).start()
    client = redis.Redis.from_url(url)
    tokens = iter(range(10**9))

    def once() -> None:
        token = str(next(tokens)).encode()
        client.lpush("bench:floor:jobs", token)
        client.brpop([b"bench:floor:reply:" + token], timeout=5)

    samples = _timed("floor", count, once)
    stop.set()
    return samples


def run_bench(options: BenchOptions) -> int:
    from registry import Registry
    from workers import Executor, Sandbox

    naive_worker = [sys.executable, "-m", "celery", "-A", "workers._naive", "worker", "--loglevel", "WARNING"]
    with local_pool(
        "bench", external=options.external, shards=options.shards, extra_commands=(naive_worker,)
    ) as (settings, _env):
        client_redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        print(
            f"bench: n={options.n} concurrency={options.concurrency} shards={settings.shards} "
            f"redis={settings.redis_url.split('@')[-1]}",
            file=sys.stderr,
        )
        import wasmtime

        sandbox = Sandbox(settings.epoch_tick_ms)
        registry = Registry(client_redis, settings, sandbox)
        registry.define_extension_point("bench")
        wasm = bytes(wasmtime.wat2wasm(TRIVIAL_WAT))
        shops = [
            next(str(n) for n in range(10**6) if shard_for(str(n), settings.shards) == s)
            for s in range(settings.shards)
        ]
        for shop in shops:
            deployment = registry.deploy("bench", shop, wasm)
        result: dict[str, Any] = {"options": options.__dict__, "machine": {"cpus": os.cpu_count()}}

        # -- references, serial ----------------------------------------------------------------
        result["floor"] = percentiles(measure_floor(settings.redis_url, options.references))
        executor = Executor(registry, sandbox, settings)
        executor.execute("bench", shops[0], PAYLOAD)
        result["in_process"] = percentiles(
            _timed("in-process", options.references, lambda: executor.execute("bench", shops[0], PAYLOAD))
        )
        if options.external:
            result["naive_celery"] = None
        else:
            from workers._naive import app as naive_app

            naive_app.conf.broker_url = naive_app.conf.result_backend = settings.redis_url
            key = settings.keys.module(deployment.sha256)
            text = json.dumps(PAYLOAD)
            naive_app.send_task("naive.execute", args=[key, text]).get(timeout=60)  # warm the worker
            result["naive_celery"] = percentiles(
                _timed(
                    "naive celery",
                    options.references,
                    lambda: naive_app.send_task("naive.execute", args=[key, text]).get(timeout=10),
                )
            )

        # -- ours --------------------------------------------------------------------------------
        with Client(settings) as client:
            time.sleep(0.3)
            for shop in shops:
                for _ in range(50):
                    client.run("bench", shop, PAYLOAD, timeout=5)
            serial = _collect(client, shops, options.serial, 1, "ours, serial")
            started = time.perf_counter()
            concurrent = _collect(
                client, shops, options.n, options.concurrency, f"ours, {options.concurrency} threads"
            )
            elapsed = time.perf_counter() - started
        result["ours_serial"] = _stage_table(serial)
        result["ours_concurrent"] = _stage_table(concurrent)
        result["throughput_per_s"] = round(len(concurrent) / elapsed, 1)
        result["failures"] = sum(not o.ok for o in serial + concurrent)
        ours_p50 = result["ours_serial"]["total"]["p50"]
        result["ratios"] = {
            "ours_over_floor_p50": round(ours_p50 / result["floor"]["p50"], 2),
            "ours_over_in_process_p50": round(ours_p50 / result["in_process"]["p50"], 2),
            "ours_over_naive_p50": (
                round(ours_p50 / result["naive_celery"]["p50"], 2) if result["naive_celery"] else None
            ),
        }
        _print(result)
        if options.json_path:
            Path(options.json_path).write_text(json.dumps(result, indent=2))
            print(f"wrote {options.json_path}", file=sys.stderr)
    return 1 if result["failures"] else 0


def _collect(client: Client, shops: list[str], count: int, concurrency: int, label: str) -> list[Outcome]:
    progress = Progress(label, count)

    def one(i: int) -> Outcome:
        outcome = client.run("bench", shops[i % len(shops)], PAYLOAD, timeout=5)
        progress.step()
        return outcome

    if concurrency <= 1:
        return [one(i) for i in range(count)]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, range(count)))


def _stage_table(outcomes: list[Outcome]) -> dict[str, dict[str, float]]:
    ok = [o for o in outcomes if o.ok and o.report is not None]
    table = {"lookup": percentiles([o.report.lookup_ms for o in ok if o.report is not None])}
    for stage in STAGES[1:]:
        table[stage] = percentiles([getattr(o.timings, f"{stage}_ms") for o in ok])
    return table


def _print(result: dict[str, Any]) -> None:
    print("\nstages, ours (serial | concurrent), ms")
    table = LiveTable(
        [("stage", 11), ("p50", 8), ("p95", 8), ("p99", 8), ("", 2), ("p50", 8), ("p95", 8), ("p99", 8)]
    )
    for stage in STAGES:
        s, c = result["ours_serial"][stage], result["ours_concurrent"][stage]
        table.row(stage, s["p50"], s["p95"], s["p99"], "|", c["p50"], c["p95"], c["p99"])
    print(f"\nthroughput (concurrent): {result['throughput_per_s']} executions/s")
    print("\nreference points (serial, same script and input), ms")
    refs = LiveTable([("design", 22), ("p50", 8), ("p95", 8), ("p99", 8)])
    for name in ("floor", "in_process", "naive_celery"):
        row = result[name]
        if row is None:
            refs.row(name, "n/a", None, None)
        else:
            refs.row(name, row["p50"], row["p95"], row["p99"])
    total = result["ours_serial"]["total"]
    refs.row("ours (serial)", total["p50"], total["p95"], total["p99"])
    r = result["ratios"]
    print(
        f"\nratios (p50): ours/floor {r['ours_over_floor_p50']}  ours/in-process "
        f"{r['ours_over_in_process_p50']}  ours/naive {r['ours_over_naive_p50']}"
    )
