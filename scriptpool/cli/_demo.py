"""``scriptpool demo``: Redis, two shard workers, the example scripts, and a table of outcomes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from scriptpool.cli._files import read_module
from scriptpool.cli._output import dumps
from scriptpool.cli._scratch import Scratch, scratch_prefix
from scriptpool.cli._table import LiveTable
from scriptpool.config import Settings, shard_for
from scriptpool.config.redis import redis_client
from scriptpool.producer import Client
from scriptpool.testing import local_pool

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


def _shop_on(shard: int, shards: int, taken: set[str], prefix: str) -> str:
    for n in range(1000, 100_000):
        shop = f"{prefix}-{n}" if prefix else str(n)
        if shop not in taken and shard_for(shop, shards) == shard:
            taken.add(shop)
            return shop
    raise AssertionError("no shop found")


def _summary(outcome: Any) -> str:
    if outcome.ok:
        return dumps(outcome.output, separators=(",", ":"))[:60]
    return f"{outcome.error_code} -> fallback {dumps(outcome.output)}"


def run_demo(*, external: bool = False) -> int:
    """Run the demo in a private pool; with ``external`` in the running one, under names of its
    own (``demo-<hex>-...``) that it removes afterwards."""
    from scriptpool.engine import Sandbox
    from scriptpool.registry import Registry

    total = 4
    with local_pool("demo", external=external, shards=2, say=lambda text: _step(1, total, text)) as (
        settings,
        _env,
    ):
        client_redis = redis_client(settings.redis_url, timeout=5, connect_timeout=2)
        registry = Registry(client_redis, settings, Sandbox(settings.epoch_tick_ms))
        scratch = Scratch(
            registry, scratch_prefix("demo") if external else "", client=client_redis, settings=settings
        )
        try:
            return _demo(settings, scratch, total)
        finally:
            scratch.cleanup()
            client_redis.close()


def _demo(settings: Settings, scratch: Scratch, total: int) -> int:
    _step(2, total, "defining extension points and deploying the examples")
    eps = {name: scratch.define(name) for name in ("discount", "cart_validation", "demo")}
    eps["slow"] = scratch.define("slow", limits={"fuel": 2_000_000_000, "wall_ms": 2000})
    taken: set[str] = set()
    planned = []
    for case in CASES:
        shop = _shop_on(case.shard, settings.shards, taken, scratch.prefix)
        wasm = read_module(str(EXAMPLES / case.module), settings.limits.module_bytes)
        deployment = scratch.deploy(eps[case.ep], shop, wasm)
        print(f"      {case.module} -> {eps[case.ep]}/{shop} (v{deployment.version})", flush=True)
        planned.append((case, shop))

    _step(3, total, "running executions through the pool")
    table = LiveTable(
        [
            ("case", 28),
            ("shop", 5 if not scratch.prefix else 16),
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
        for case, shop in planned:
            payload = json.loads((EXAMPLES / case.input_file).read_text()) if case.input_file else {}
            outcome = client.run(eps[case.ep], shop, payload, timeout=case.timeout_s, fallback=case.fallback)
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
    _step(4, total, "removing what the demo created and stopping what it started")
    return 1 if failures else 0
