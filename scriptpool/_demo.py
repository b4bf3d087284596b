"""``scriptpool demo``: Redis, two shard workers, the example scripts, and a table of outcomes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import redis

from config import shard_for
from producer import Client
from scriptpool._files import read_module
from scriptpool._local_pool import local_pool
from scriptpool._table import LiveTable

# Shipped inside the tool package, so the demo runs from any install (not only a checkout).
EXAMPLES = Path(str(resources.files("scriptpool.examples")))


@dataclass(frozen=True)
class Case:
    """One demo execution."""

    title: str
    ep: str
    module: str
    input_file: str | None
    timeout_s: float = 2.0
    fallback: Any = None
    shard: int = 0


CASES = [
    Case("discount (C)", "discount", "discount/discount.wasm", "discount/input.json", shard=0),
    Case("discount (C)", "discount", "discount/discount.wasm", "discount/input.json", shard=1),
    Case("cart validation (C)", "cart_validation", "cart_validation/cart_validation.wasm",
         "cart_validation/input.json", shard=1),
    Case("hello (WAT)", "demo", "wat/hello.wat", "wat/input.json", shard=0),
    Case("hostile: infinite loop", "demo", "hostile/infinite_loop.wat", None, fallback={"discounts": []}),
    Case("slow script, 10 ms deadline", "slow", "slow/slow.wat", None, timeout_s=0.010,
         fallback={"discounts": []}, shard=1),
]  # fmt: skip


def _step(n: int, total: int, text: str) -> None:
    print(f"[{n}/{total}] {text}", flush=True)


def _shop_on(shard: int, shards: int, taken: set[str]) -> str:
    for n in range(1000, 100_000):
        shop = str(n)
        if shop not in taken and shard_for(shop, shards) == shard:
            taken.add(shop)
            return shop
    raise AssertionError("no shop found")


def _summary(outcome: Any) -> str:
    if outcome.ok:
        return json.dumps(outcome.output, separators=(",", ":"))[:60]
    return f"{outcome.error_code} -> fallback {json.dumps(outcome.output)}"


def run_demo(*, external: bool = False) -> int:
    """Run the demo; with ``external`` use the Redis and workers already running."""
    from engine import Sandbox
    from registry import Registry

    total = 4
    with local_pool("demo", external=external, shards=2, say=lambda text: _step(1, total, text)) as (
        settings,
        _env,
    ):
        client_redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        _step(2, total, "defining extension points and deploying the examples")
        registry = Registry(client_redis, settings, Sandbox(settings.epoch_tick_ms))
        for ep in ("discount", "cart_validation", "demo"):
            registry.define_extension_point(ep)
        registry.define_extension_point("slow", limits={"fuel": 2_000_000_000, "wall_ms": 2000})
        taken: set[str] = set()
        planned = []
        for case in CASES:
            shop = _shop_on(case.shard, settings.shards, taken)
            deployment = registry.deploy(case.ep, shop, read_module(str(EXAMPLES / case.module)))
            print(f"      {case.module} -> {case.ep}/{shop} (v{deployment.version})", flush=True)
            planned.append((case, shop))

        _step(3, total, "running executions through the pool")
        table = LiveTable(
            [
                ("case", 28),
                ("shop", 5),
                ("shard", 5),
                ("status", 8),
                ("result", 62),
                ("enqueue", 7),
                ("queue", 7),
                ("execute", 7),
                ("result", 7),
                ("total ms", 8),
            ]
        )
        failures = 0
        with Client(settings) as client:
            time.sleep(0.3)
            for case, shop in planned:
                payload = json.loads((EXAMPLES / case.input_file).read_text()) if case.input_file else {}
                outcome = client.run(case.ep, shop, payload, timeout=case.timeout_s, fallback=case.fallback)
                t = outcome.timings
                table.row(
                    case.title,
                    shop,
                    outcome.shard,
                    outcome.status,
                    _summary(outcome),
                    t.enqueue_ms,
                    t.queue_wait_ms,
                    t.execute_ms,
                    t.result_ms,
                    t.total_ms,
                )
                expected_ok = not case.title.startswith(("hostile", "slow"))
                failures += outcome.ok != expected_ok
        _step(4, total, "stopping everything this demo started")
    return 1 if failures else 0
