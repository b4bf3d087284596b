"""Caller latency with every run captured, against capture off, in the same run, interleaved.

Run: .venv/bin/python scripts/bench_capture.py [--calls 400] [--rounds 16]
Starts a private Redis and two solo workers: shard 0's with capture on, shard 1's with
SCRIPTPOOL_CAPTURE=0. One client calls a shop on each shard in turn (which goes first
alternates), serially. Rounds alternate the EP's capture_rate between 1 (shard 0 captures every
run) and 0 (it captures none: both workers do the same work, an A/A control for whatever else
differs between the two processes). Per input size it prints, as one JSON object, the medians
over rounds of each side's p50 and p95, and the capture cost: for each capture round and the
A/A round after it, the on-off difference with capture_rate 1 less the same difference with
capture_rate 0; their median, and each pair's.
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
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scriptpool.config import Settings, shard_for  # noqa: E402
from scriptpool.engine import Sandbox  # noqa: E402
from scriptpool.producer import BreakerPolicy, Client  # noqa: E402
from scriptpool.registry import Registry  # noqa: E402
from scriptpool.runtime import CaptureStore  # noqa: E402
from scriptpool.testing import EmbeddedRedis, percentiles, worker_argv  # noqa: E402

KEY = secrets.token_hex(32)  # random: a published key signs nothing
DISCOUNT = ROOT / "examples" / "discount"


def cart(lines: int) -> dict[str, object]:
    base = json.loads((DISCOUNT / "input.json").read_text())
    line = base["cart"]["lines"][0]
    base["cart"]["lines"] = [{**line, "id": f"gid://shopify/CartLine/{n}"} for n in range(lines)]
    return base


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=400, help="calls per side per round")
    parser.add_argument("--rounds", type=int, default=16, help="rounds per input size, half of them A/A")
    args = parser.parse_args()
    out: dict[str, object] = {"calls_per_round": args.calls, "rounds": args.rounds}
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=KEY.encode(), shards=2, capture_per_shop=500)
        registry = Registry(redis.Redis.from_url(server.url), settings, Sandbox())
        registry.define_extension_point("bench", capture_rate=1.0)
        shops = {}
        for shard in (0, 1):
            shops[shard] = next(s for s in (f"b{n}" for n in range(1000)) if shard_for(s, 2) == shard)
            registry.deploy("bench", shops[shard], (DISCOUNT / "discount.wasm").read_bytes())
        processes = []
        for shard, capture in ((0, "1"), (1, "0")):
            env = {
                **os.environ,
                **settings.to_env(),
                "SCRIPTPOOL_CAPTURE": capture,
                "PYTHONPATH": str(ROOT),
            }
            log = Path(tempfile.mkdtemp()) / f"worker{shard}.log"
            argv = [*worker_argv(settings, [shard], name=f"bench{shard}@%h"), "--logfile", str(log)]
            argv[argv.index("INFO")] = "WARNING"  # no log line per execution on either side
            quiet = subprocess.DEVNULL  # its banner would mix with the JSON on stdout
            processes.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=quiet, stderr=quiet))
        try:
            with Client(settings, breaker=BreakerPolicy(error_threshold=10**9)) as client:
                deadline = time.monotonic() + 60
                for shop in shops.values():
                    while not client.run("bench", shop, cart(3), timeout=1).ok:
                        assert time.monotonic() < deadline, "workers did not start"
                for lines in (3, 300):
                    payload = cart(lines)
                    size = len(json.dumps(payload, separators=(",", ":")))
                    rounds: list[tuple[float, dict[str, dict[str, float]]]] = []
                    for round_number in range(args.rounds):
                        rate = 1.0 if round_number % 2 == 0 else 0.0
                        registry.define_extension_point("bench", capture_rate=rate)
                        time.sleep(0.3)  # every worker has dropped the old definition
                        for _ in range(50):  # warm both sides
                            client.run("bench", shops[0], payload, timeout=2)
                            client.run("bench", shops[1], payload, timeout=2)
                        samples: dict[str, list[float]] = {"on": [], "off": []}
                        for i in range(args.calls):
                            order = ((0, "on"), (1, "off")) if i % 2 == 0 else ((1, "off"), (0, "on"))
                            for shard, side in order:
                                outcome = client.run("bench", shops[shard], payload, timeout=2)
                                assert outcome.ok, outcome.error
                                samples[side].append(outcome.timings.total_ms)
                        rounds.append((rate, {side: percentiles(v) for side, v in samples.items()}))
                    summary: dict[str, object] = {}
                    for rate in (1.0, 0.0):
                        for side in ("on", "off"):
                            results = [r[side] for rr, r in rounds if rr == rate]
                            summary[f"rate_{rate:g}_{side}"] = {
                                q: round(statistics.median(r[q] for r in results), 3) for q in ("p50", "p95")
                            }
                    # Each capture round against the A/A round after it: the on-off gap with every
                    # run captured, less the gap when neither side captures anything.
                    costs: dict[str, list[float]] = {"p50": [], "p95": []}
                    for (_, captured), (_, control) in zip(rounds[::2], rounds[1::2], strict=False):
                        for q in costs:
                            gap = captured["on"][q] - captured["off"][q]
                            control_gap = control["on"][q] - control["off"][q]
                            costs[q].append(round(gap - control_gap, 4))
                    summary["capture_cost_ms"] = {
                        q: {"median": round(statistics.median(v), 3), "per_pair": v} for q, v in costs.items()
                    }
                    out[f"input_{size}_bytes"] = summary
            time.sleep(0.5)  # the capture thread writes what is left
            store = CaptureStore(redis.Redis.from_url(server.url), settings)
            out["captured_runs_kept"] = len(store.summaries(limit=10_000))
            out["captured_bytes"] = store.total_bytes()
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
