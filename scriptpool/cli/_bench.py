"""``scriptpool bench``: the report's stage table for our pool, against the floor, the in-process
engine and naive Celery, all measured in one run on the same script and input."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from scriptpool.cli._scratch import Scratch, scratch_prefix
from scriptpool.cli._table import LiveTable
from scriptpool.config import Settings, shard_for
from scriptpool.config.redis import describe_redis_url, redis_client
from scriptpool.producer import Client, Outcome
from scriptpool.testing import TRIVIAL_WAT, CpuMeter, local_pool, percentiles

if TYPE_CHECKING:
    from scriptpool.engine import Sandbox

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
    json_output: bool = False  # print the results as one JSON object on stdout
    duration: float = 0.0  # > 0: the concurrent run lasts this many seconds instead of n calls
    use_asyncio: bool = False  # concurrent callers are coroutines (run_async) on one event loop


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


def measure_floor(url: str, count: int, prefix: str) -> list[float]:
    """Push a job and block on a reply list, answered by an echo thread: the least a Redis
    request-reply can cost from Python. Its lists (under ``prefix``) are empty again afterwards."""
    stop = threading.Event()
    jobs = f"{prefix}:floor:jobs"
    worker = redis_client(url, timeout=5, connect_timeout=2)

    def echo() -> None:
        while not stop.is_set():
            item = worker.brpop([jobs], timeout=1)
            if item:
                worker.lpush(f"{prefix}:floor:reply:".encode() + cast(bytes, item[1]), b"{}")

    threading.Thread(target=echo, daemon=True).start()
    client = redis_client(url, timeout=10, connect_timeout=2)
    tokens = iter(range(10**9))

    def once() -> None:
        token = str(next(tokens)).encode()
        client.lpush(jobs, token)
        client.brpop([f"{prefix}:floor:reply:".encode() + token], timeout=5)

    samples = _timed("floor", count, once)
    stop.set()
    return samples


def run_bench(options: BenchOptions) -> int:
    """Run the bench and print its tables (or, with ``json_output``, one JSON object)."""
    from scriptpool.engine import Sandbox
    from scriptpool.registry import Registry

    # The naive reference runs only in a private pool: never on a user's Redis and queues.
    naive_worker = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "scriptpool.cli._naive",
        "worker",
        "--loglevel",
        "WARNING",
    ]
    extra = () if options.external else (naive_worker,)
    with local_pool("bench", external=options.external, shards=options.shards, extra_commands=extra) as (
        settings,
        _env,
    ):
        client_redis = redis_client(settings.redis_url, timeout=10, connect_timeout=2)
        sandbox = Sandbox(settings.epoch_tick_ms)
        scratch = Scratch(
            Registry(client_redis, settings, sandbox),
            scratch_prefix("bench") if options.external else "",
            client=client_redis,
            settings=settings,
        )
        try:
            result = _bench(options, settings, scratch, sandbox)
        finally:
            scratch.cleanup()
            client_redis.close()
    if options.json_output:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 1 if result["failures"] else 0


def _bench(options: BenchOptions, settings: Settings, scratch: Scratch, sandbox: Sandbox) -> dict[str, Any]:
    import wasmtime

    from scriptpool.runtime import Executor

    print(
        f"bench: n={options.n} concurrency={options.concurrency} shards={settings.shards} "
        f"redis={describe_redis_url(settings.redis_url)}",
        file=sys.stderr,
    )
    ep = scratch.define("bench")
    wasm = bytes(wasmtime.wat2wasm(TRIVIAL_WAT))
    shops = [
        next(shop for n in range(10**6) if shard_for(shop := scratch.name(str(n)), settings.shards) == s)
        for s in range(settings.shards)
    ]
    for shop in shops:
        deployment = scratch.deploy(ep, shop, wasm)
    result: dict[str, Any] = {"options": options.__dict__, "machine": {"cpus": os.cpu_count()}}

    # -- references, serial ----------------------------------------------------------------------
    result["floor"] = percentiles(
        measure_floor(settings.redis_url, options.references, scratch.name("bench"))
    )
    executor = Executor(scratch.registry, sandbox, settings)
    executor.execute(ep, shops[0], PAYLOAD)
    result["in_process"] = percentiles(
        _timed("in-process", options.references, lambda: executor.execute(ep, shops[0], PAYLOAD))
    )
    result["naive_celery"] = (
        None if options.external else _naive(settings, deployment.sha256, options.references)
    )

    # -- ours --------------------------------------------------------------------------------------
    with Client(settings) as client:
        for shop in shops:
            for _ in range(50):
                client.run(ep, shop, PAYLOAD, timeout=5)
        serial = _serial(client, ep, shops, options.serial)
        before = client.batching_stats()
        meter = CpuMeter().start()
        started = time.perf_counter()
        concurrent, per_second = _load(
            client,
            ep,
            shops,
            options.concurrency,
            count=options.n,
            duration=options.duration,
            use_asyncio=options.use_asyncio,
        )
        elapsed = time.perf_counter() - started
        cpu = meter.stop()
        after = client.batching_stats()
    messages = sum(after[s][0] - before[s][0] for s in after)
    jobs = sum(after[s][1] - before[s][1] for s in after)
    result["jobs_per_message"] = round(jobs / messages, 2) if messages else None
    if options.duration > 0:
        result["sustained"] = {
            "duration_s": options.duration,
            "per_second_min": min(per_second, default=0),
            "per_second_p50": percentiles([float(n) for n in per_second])["p50"],
        }
    result["concurrency"] = {
        "callers": options.concurrency,
        "kind": "asyncio" if options.use_asyncio else "threads",
    }
    result["ours_serial"] = _stage_table(serial)
    result["ours_concurrent"] = _stage_table(concurrent)
    result["throughput_per_s"] = round(len(concurrent) / elapsed, 1)
    result["cpu_per_execution_us"] = _cpu_per_execution(cpu, len(concurrent), elapsed, options.external)
    result["failures"] = sum(not o.ok for o in serial + concurrent)
    ours_p50 = result["ours_serial"]["total"]["p50"]
    naive = result["naive_celery"]
    result["ratios"] = {
        "ours_over_floor_p50": round(ours_p50 / result["floor"]["p50"], 2),
        "ours_over_in_process_p50": round(ours_p50 / result["in_process"]["p50"], 2),
        "ours_over_naive_p50": round(ours_p50 / naive["p50"], 2) if naive else None,
    }
    return result


def _cpu_per_execution(
    cpu: dict[str, float], executions: int, elapsed: float, external: bool
) -> dict[str, Any]:
    """CPU microseconds per execution of the concurrent phase, by part (the bench process, its
    callers included; the private pool's workers and Redis, unless ``external``), their sum, and
    what that sum allows on this machine's cores: the physical limit of the design here."""
    if not executions:
        return {}
    parts = {"clients": cpu.get("this process", 0.0)}
    if not external:
        parts["workers"] = cpu.get("workers", 0.0)
        parts["redis"] = cpu.get("redis", 0.0)
    per = {name: round(seconds / executions * 1e6, 1) for name, seconds in parts.items()}
    total = sum(parts.values()) / executions
    cores = os.cpu_count() or 1
    return {
        **per,
        "total": round(total * 1e6, 1),
        "cores_busy": round(sum(parts.values()) / elapsed, 2),
        "cores": cores,
        "limit_per_s": None if external else round(cores / total) if total else None,
    }


def _naive(settings: Settings, sha256: str, count: int) -> dict[str, float]:
    """The naive design's serial latency: default Celery, stock Redis backend, compile per call."""
    from celery import Celery

    from scriptpool.cli._naive import QUEUE

    # Default settings, as scriptpool.cli._naive's own app, but a fresh app per run, so a second bench
    # in one process does not reuse the first one's connections (its Redis is gone).
    app = Celery("naive", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.task_default_queue = QUEUE
    key = settings.keys.module(sha256)
    text = json.dumps(PAYLOAD)
    try:
        app.send_task("naive.execute", args=[key, text]).get(timeout=60)  # warm the worker
        return percentiles(
            _timed(
                "naive celery",
                count,
                lambda: app.send_task("naive.execute", args=[key, text]).get(timeout=10),
            )
        )
    finally:
        app.close()


def _serial(client: Client, ep: str, shops: list[str], count: int) -> list[Outcome]:
    progress = Progress("ours, serial", count)
    outcomes = []
    for i in range(count):
        outcomes.append(client.run(ep, shops[i % len(shops)], PAYLOAD, timeout=5))
        progress.step()
    return outcomes


def _load(
    client: Client,
    ep: str,
    shops: list[str],
    concurrency: int,
    *,
    count: int,
    duration: float,
    use_asyncio: bool,
) -> tuple[list[Outcome], list[int]]:
    """``concurrency`` callers back to back, threads or coroutines of one event loop, for
    ``count`` calls or, if ``duration`` > 0, that many seconds. Also returns how many calls
    completed in each whole second, so a dip shows even when the average looks fine."""
    started = time.perf_counter()
    end = started + duration if duration > 0 else float("inf")
    kind = "asyncio tasks" if use_asyncio else "threads"
    progress = Progress(f"ours, {concurrency} {kind}", int(duration) if duration > 0 else count)
    issued = itertools.count()
    outcomes: list[Outcome] = []
    buckets: list[int] = []
    lock = threading.Lock()

    def take() -> int | None:
        i = next(issued)
        if (duration <= 0 and i >= count) or time.perf_counter() >= end:
            return None
        return i

    def record(outcome: Outcome) -> None:
        second = int(time.perf_counter() - started)
        with lock:
            outcomes.append(outcome)
            buckets.extend([0] * (second + 1 - len(buckets)))
            buckets[second] += 1
        if duration <= 0:
            progress.step()

    def caller() -> None:
        while (i := take()) is not None:
            record(client.run(ep, shops[i % len(shops)], PAYLOAD, timeout=5))

    async def coroutine() -> None:
        while (i := take()) is not None:
            record(await client.run_async(ep, shops[i % len(shops)], PAYLOAD, timeout=5))

    async def all_coroutines() -> None:
        await asyncio.gather(*(coroutine() for _ in range(concurrency)))

    def ticker() -> None:
        for second in range(1, int(duration) + 1):
            time.sleep(max(0.0, started + second - time.perf_counter()))
            progress.step()

    if duration > 0:
        threading.Thread(target=ticker, daemon=True).start()
    if use_asyncio:
        asyncio.run(all_coroutines())
    else:
        threads = [threading.Thread(target=caller) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    whole_seconds = int(time.perf_counter() - started)
    return outcomes, buckets[:whole_seconds]


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
    callers = result["concurrency"]
    print(
        f"\nthroughput (concurrent, {callers['callers']} {callers['kind']}): "
        f"{result['throughput_per_s']} executions/s, {result['jobs_per_message']} jobs per message"
    )
    if "sustained" in result:
        sustained = result["sustained"]
        print(
            f"sustained for {sustained['duration_s']} s: slowest second {sustained['per_second_min']}"
            f" executions, median second {sustained['per_second_p50']}"
        )
    cpu = result.get("cpu_per_execution_us") or {}
    if cpu:
        parts = ", ".join(f"{name} {cpu[name]}" for name in ("clients", "workers", "redis") if name in cpu)
        print(
            f"cpu per execution, us: {parts}; total {cpu['total']}"
            f" ({cpu['cores_busy']} of {cpu['cores']} cores busy)"
        )
        if cpu.get("limit_per_s"):
            print(
                f"physical limit at that cost: {cpu['limit_per_s']} executions/s on {cpu['cores']} cores"
                f" (this run reached {round(100 * result['throughput_per_s'] / cpu['limit_per_s'])}%)"
            )
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
