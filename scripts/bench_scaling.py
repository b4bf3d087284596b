"""Serial latency through Sentinel against a direct URL, and one shard group against two.

Run: .venv/bin/python scripts/bench_scaling.py [--calls 2000] [--rounds 3] [--seconds 10]

1. Sentinel: a private Sentinel set (3 sentinels, primary, replica) and one solo worker that
   consumes through the sentinel:// URL. Two clients, one with the sentinel:// URL and one with the
   primary's redis:// URL, take turns (--rounds each, --calls serial calls per round): both end
   on the same Redis, queue and worker, so the difference is what the URL costs.
2. Groups: two private Redis and two shards, one solo worker per shard. "one group": both shards
   on Redis A; "two groups": shard 0 on A, shard 1 on B. Each layout in turn (--rounds each):
   --calls serial calls, then 4 caller threads for --seconds. Prints JSON.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_engine import TRIVIAL  # noqa: E402

from scriptpool.config import Settings, shard_for  # noqa: E402
from scriptpool.producer import Client  # noqa: E402
from scriptpool.registry import Registries  # noqa: E402
from scriptpool.testing import EmbeddedRedis, EmbeddedSentinelSet, percentiles, worker_argv  # noqa: E402

KEY = secrets.token_hex(32).encode()  # random: a published key signs nothing


@contextmanager
def workers(settings: Settings, layout: dict[str, list[int]]) -> Iterator[None]:
    """Solo workers (name -> shards) with ``settings``, ready when this yields."""
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)}
    started = []
    for name, shards in layout.items():
        log = Path(tempfile.mkdtemp()) / f"{name}.log"
        argv = [*worker_argv(settings, shards, name=f"{name}@bench"), "--logfile", str(log)]
        quiet = subprocess.DEVNULL
        started.append((subprocess.Popen(argv, env=env, cwd=ROOT, stdout=quiet, stderr=quiet), log))
    try:
        for process, log in started:
            deadline = time.monotonic() + 30
            while " ready." not in (log.read_text() if log.exists() else ""):
                assert process.poll() is None and time.monotonic() < deadline, "worker did not start"
                time.sleep(0.05)
        yield
    finally:
        for process, _ in started:
            process.terminate()
        for process, _ in started:
            process.wait(10)


def serial(client: Client, shops: list[str], calls: int) -> list[float]:
    for shop in shops:  # warm: connections, caches
        for _ in range(50):
            client.run("bench", shop, {}, timeout=2)
    samples = []
    for i in range(calls):
        outcome = client.run("bench", shops[i % len(shops)], {}, timeout=2)
        assert outcome.ok, outcome
        samples.append(outcome.timings.total_ms)
    return samples


def throughput(client: Client, shops: list[str], seconds: float, threads: int = 4) -> float:
    done = [0] * threads
    stop = time.monotonic() + seconds

    def work(n: int) -> None:
        i = n
        while time.monotonic() < stop:
            if client.run("bench", shops[i % len(shops)], {}, timeout=2).ok:
                done[n] += 1
            i += threads

    pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(done) / seconds


def deploy(settings: Settings, shops: list[str]) -> None:
    registries = Registries(settings)
    registries.everywhere(lambda r: r.define_extension_point("bench"), what="bench", again="again")
    for shop in shops:
        with registries.on_shop(shop, what=shop, again="again") as registry:
            registry.deploy("bench", shop, TRIVIAL)


def sentinel_against_direct(calls: int, rounds: int) -> dict[str, object]:
    with EmbeddedSentinelSet() as sentinels:
        via = Settings(redis_url=sentinels.url, artifact_key=KEY, shards=1)
        direct = via.replace(redis_url=sentinels.direct_url())
        deploy(via, ["1"])
        results: dict[str, list[float]] = {"sentinel": [], "direct": []}
        with workers(via, {"w": [0]}):
            for _ in range(rounds):
                for name, settings in (("sentinel", via), ("direct", direct)):
                    with Client(settings) as client:
                        results[name] += serial(client, ["1"], calls)
    return {name: percentiles(samples) for name, samples in results.items()}


def one_group_against_two(calls: int, rounds: int, seconds: float) -> dict[str, object]:
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        layouts = {
            "one group": Settings(artifact_key=KEY, shards=2, shard_groups=f"0-1={a.url}"),
            "two groups": Settings(artifact_key=KEY, shards=2, shard_groups=f"0={a.url};1={b.url}"),
        }
        shops = [next(s for s in map(str, range(100)) if shard_for(s, 2) == n) for n in (0, 1)]
        out: dict[str, dict[str, list[float]]] = {name: {"serial": [], "per_s": []} for name in layouts}
        for _ in range(rounds):
            for name, settings in layouts.items():
                for server in (a, b):
                    redis.Redis.from_url(server.url).flushall()
                deploy(settings, shops)
                with workers(settings, {"s0": [0], "s1": [1]}), Client(settings) as client:
                    out[name]["serial"] += serial(client, shops, calls)
                    out[name]["per_s"].append(throughput(client, shops, seconds))
        return {
            name: {**percentiles(v["serial"]), "calls_per_s": [round(x) for x in v["per_s"]]}
            for name, v in out.items()
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(
        json.dumps(
            {
                "sentinel_against_direct_ms": sentinel_against_direct(args.calls, args.rounds),
                "one_group_against_two": one_group_against_two(args.calls, args.rounds, args.seconds),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
