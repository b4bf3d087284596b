"""Script data reads: what a hot read costs a call on the worker, against the same data sent in
the input by the host; and how long a host-side write takes to reach every worker.

Run: .venv/bin/python scripts/bench_store.py [--runs 400] [--writes 40]
Prints one JSON object. Everything on a private Redis (EmbeddedRedis).

``reads`` (in this process, on the runtime's Executor and StoreCache, as a worker runs them): an
EP whose input schema has ``v: JSON`` and a script that reads its whole input and prints ``{}``
(so every variant's script reads the same bytes). Per value size, medians per call of
``Executor.execute`` with the job's JSON text, all variants interleaved run by run:

- ``hot``: the query selects ``v: store(scope: SHOP, key: "k")``; the job carries ``{}``; the
  worker resolves the value from its cache (read once from Redis, then hot).
- ``sent``: the query selects ``v``; the job carries ``{"v": VALUE}`` (what a host that loaded
  the data itself would send): the worker decodes it and projects it.
- ``none``: the query selects a small field only; the job carries ``{}``: the baseline.

``hot_read_us`` = hot - none and ``sent_in_input_us`` = sent - none, the worker-side cost of the value
either way; ``host_encode_us`` is what the host pays to encode ``{"v": VALUE}`` for the job
(``encode_input``), which a hot read saves too, with the bytes it sends. The 100 kB value is over
the 64 KiB cap on a written value (``MAX_VALUE_BYTES``), so it is put with a raw ``HSET``: what
the worker pays if that cap were raised.

``propagation`` (two real workers, solo pool, one per shard): both hold an APP value hot (an
echo script selects it); then ``DataStore.set`` writes a new one, and a thread per worker calls
its shop in a loop until it answers the new value. Per write: the time from just before
``set`` to each worker's first answer with it (the last of the two: "every worker"); the
poll's own call time is included (a call takes about 0.5 to 1 ms here). ``pubsub_ms``: the time
from just before ``set`` to a subscriber in this process receiving the data message, for
reference (the floor a worker's listener sees).
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
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SDL = "scalar JSON\ntype Input { v: JSON  small: Int }"
READ_ALL = """
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{}")
  (func (export "_start")
    (block $done (loop $more
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 4096))
      (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br_if $done (i32.eqz (i32.load (i32.const 8))))
      (br $more)))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 2))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""
# Reads stdin (up to 60 KiB) and prints it: what the propagation calls see.
ECHO = """
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start") (local $total i32) (local $n i32)
    (block $done (loop $more
      (i32.store (i32.const 0) (i32.add (i32.const 1024) (local.get $total)))
      (i32.store (i32.const 4) (i32.sub (i32.const 61440) (local.get $total)))
      (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $n (i32.load (i32.const 8)))
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $total (i32.add (local.get $total) (local.get $n)))
      (br $more)))
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (local.get $total))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def rates(size: int) -> dict[str, Any]:
    """A carrier's rate table of about ``size`` bytes of JSON."""
    table: dict[str, Any] = {"carrier": "ACME", "currency": "EUR", "zones": []}
    n = 0
    while len(json.dumps(table, separators=(",", ":"))) < size:
        table["zones"].append(
            {"zone": f"Z{n:04d}", "upTo": [0.5, 1, 2, 5, 10], "price": [4.9, 5.9, 7.5, 11, 19]}
        )
        n += 1
    return table


def reads(args: argparse.Namespace) -> dict[str, Any]:
    """The worker-side cost of a hot read against the same value sent by the host (see above)."""
    import redis
    import wasmtime

    from scriptpool.config import Settings
    from scriptpool.config.wire import encode_input, query_digest
    from scriptpool.engine import Sandbox
    from scriptpool.registry import Registry
    from scriptpool.runtime import Executor, StoreCache
    from scriptpool.testing import EmbeddedRedis

    module = bytes(wasmtime.wat2wasm(READ_ALL))
    queries = {
        "hot": 'query { v: store(scope: SHOP, key: "k") }',
        "sent": "query { v }",
        "none": "query { small }",
    }
    out: dict[str, Any] = {}
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=secrets.token_hex(32).encode(), shards=1)
        client = redis.Redis.from_url(server.url)
        sandbox = Sandbox()
        registry = Registry(client, settings, sandbox)
        registry.define_extension_point("reads", limits={"input_bytes": 1 << 20}, input_graphql=SDL)
        for name, query in queries.items():
            registry.deploy("reads", name, module, input_query=query)
        store = StoreCache(client, settings.keys)
        executor = Executor(registry, sandbox, settings, store=store)
        for label, size in (("1kB", 1_000), ("100kB", 100_000)):
            value = rates(size)
            text = json.dumps(value, separators=(",", ":"))
            client.hset(settings.keys.data_shop("default", "hot"), "k", text)
            store.invalidate(None)
            jobs = {
                "hot": (b"{}", {"default": query_digest(queries["hot"])}),
                "sent": (encode_input({"v": value}), {"default": query_digest(queries["sent"])}),
                "none": (b"{}", {"default": query_digest(queries["none"])}),
            }
            times: dict[str, list[float]] = {name: [] for name in jobs}
            order = list(jobs)
            for n in range(args.runs + 50):
                order = order[1:] + order[:1]  # each variant first in turn: no position favoured
                for name in order:
                    payload, sent = jobs[name]
                    started = time.perf_counter()
                    execution = executor.execute("reads", name, payload, queries=sent)
                    elapsed = time.perf_counter() - started
                    assert execution.ok, execution
                    if n >= 50:  # warm: module hot, plan compiled, value cached
                        times[name].append(elapsed)
            encode = []
            for _ in range(args.runs):
                started = time.perf_counter()
                encode_input({"v": value})
                encode.append(time.perf_counter() - started)
            med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
            out[label] = {
                "value_bytes": len(text),
                **{f"call_{name}_us": round(us, 1) for name, us in med.items()},
                "hot_read_us": round(med["hot"] - med["none"], 1),
                "sent_in_input_us": round(med["sent"] - med["none"], 1),
                "host_encode_us": round(statistics.median(encode) * 1e6, 1),
                "job_bytes_sent": len(jobs["sent"][0]),
                "job_bytes_hot": len(jobs["hot"][0]),
            }
        stats = store.stats()
        out["hit_ratio_shop"] = round(stats.hit_ratio("SHOP") or 0.0, 4)
        client.close()
    return out


def propagation(args: argparse.Namespace) -> dict[str, Any]:
    """The time from a host-side write to every worker serving it (see above)."""
    import redis
    import wasmtime

    from scriptpool.config import Settings, shard_for
    from scriptpool.engine import Sandbox
    from scriptpool.producer import Client, DataStore
    from scriptpool.registry import Registry
    from scriptpool.testing import EmbeddedRedis, worker_argv

    key = secrets.token_hex(32)
    echo = bytes(wasmtime.wat2wasm(ECHO))
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=key.encode(), shards=2)
        registry = Registry(redis.Redis.from_url(server.url), settings, Sandbox())
        registry.define_extension_point("prop", input_graphql=SDL)
        shops: list[str] = []
        for shard in (0, 1):
            shops.append(next(f"s{n}" for n in range(1000) if shard_for(f"s{n}", 2) == shard))
        for shop in shops:
            registry.deploy("prop", shop, echo, input_query='query { a: store(scope: APP, key: "k") }')
        env = dict(
            os.environ, SCRIPTPOOL_REDIS_URL=server.url, SCRIPTPOOL_ARTIFACT_KEY=key, SCRIPTPOOL_SHARDS="2"
        )
        env["PYTHONPATH"] = str(ROOT)
        logs = Path(tempfile.mkdtemp())
        procs = [
            subprocess.Popen(
                [*worker_argv(settings, [shard], name=f"bench-store-{shard}@%h", pool="solo"),
                 "--logfile", str(logs / f"w{shard}.log")],
                env=env,
                cwd=ROOT,
            )
            for shard in (0, 1)
        ]  # fmt: skip
        every: list[float] = []
        each: list[float] = []
        pubsub_ms: list[float] = []
        try:
            with Client(settings) as client, DataStore(settings) as data:
                data.set("default", "k", -1)
                for shop in shops:
                    deadline = time.monotonic() + 30
                    while not client.run("prop", shop, {}, timeout=1).ok:
                        assert time.monotonic() < deadline, "workers did not start"
                listener = redis.Redis.from_url(server.url).pubsub()
                listener.subscribe(settings.keys.invalidations())
                listener.get_message(timeout=1)  # the confirmation
                for n in range(args.writes):
                    for shop in shops:  # both hold the old value now
                        for _ in range(3):
                            assert client.run("prop", shop, {}, timeout=2).output == {"a": n - 1}
                    seen: dict[str, float] = {}

                    def poll(shop: str, want: int, started: float, seen: dict[str, float] = seen) -> None:
                        while True:
                            outcome = client.run("prop", shop, {}, timeout=2)
                            if outcome.ok and outcome.output == {"a": want}:
                                seen[shop] = (time.perf_counter() - started) * 1000
                                return

                    started = time.perf_counter()
                    threads = [threading.Thread(target=poll, args=(shop, n, started)) for shop in shops]
                    for thread in threads:
                        thread.start()
                    data.set("default", "k", n)
                    message = None
                    while message is None or message["type"] != "message":
                        message = listener.get_message(timeout=1)
                    pubsub_ms.append((time.perf_counter() - started) * 1000)
                    for thread in threads:
                        thread.join(10)
                    every.append(max(seen.values()))
                    each.extend(seen.values())
                    time.sleep(0.05)
                listener.close()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait()

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {
        "writes": args.writes,
        "every_worker_p50_ms": pct(every, 0.5),
        "every_worker_p95_ms": pct(every, 0.95),
        "every_worker_max_ms": round(max(every), 2),
        "each_worker_p50_ms": pct(each, 0.5),
        "pubsub_p50_ms": pct(pubsub_ms, 0.5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=400, help="calls per variant and size (reads)")
    parser.add_argument("--writes", type=int, default=40, help="writes timed (propagation)")
    parser.add_argument("--only", choices=("reads", "propagation"), help="one part only")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    result: dict[str, Any] = {}
    if args.only in (None, "reads"):
        result["reads"] = reads(args)
    if args.only in (None, "propagation"):
        result["propagation"] = propagation(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
