"""The cost of an input query's projection per call, against the alternatives.

Run: .venv/bin/python scripts/bench_input_query.py [--runs 300] [--lines 200]
     .venv/bin/python scripts/bench_input_query.py --end-to-end [--calls 300] [--lines 200]
Prints one JSON object (``--end-to-end``: through a real worker, see :func:`end_to_end`).
The input: a cart of ``--lines`` lines in the style of Shopify's cart
input (each line's merchandise a product variant with its full product: title, handle, tags,
vendor, description, variants; prices; attributes; the buyer's identity), 132 kB of JSON at 200
lines, against examples/input_query/discount/schema.graphql. The query selects about a seventh of
its bytes (quantities, variant ids, one tag check per line through a host loader taking the
tags, the discount's metafield through another).

Medians per call, all variants interleaved run by run so that they see the same machine noise:

- ``projection_ms``: the compiled projection (``Projection.project``), the technique in use.
- ``graphql_execute_ms``: graphql-core's ``execute_sync`` with its default resolvers over the
  same dict (the document parsed and validated once, outside the timing), the alternative.
- ``dumps_full_ms`` / ``dumps_projected_ms``: ``json.dumps`` of the full input and of the
  projection, what sending either would cost to encode.
- ``full_bytes`` / ``projected_bytes``: their sizes; ``same_result``: both techniques agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from graphql import execute_sync

from scriptpool.config.input_query import InputQuery, InputSchema

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "examples" / "input_query" / "discount" / "schema.graphql"

QUERY = """
query RunInput {
  cart {
    lines {
      quantity
      merchandise {
        ... on ProductVariant {
          id
          product { onSale: hasAnyTag(tags: ["sale"]) }
        }
      }
    }
  }
  discountNode {
    metafield(namespace: "$app:volume", key: "config") { jsonValue }
  }
}
"""


def money(amount: float) -> dict[str, Any]:
    """A MoneyV2 value."""
    return {"amount": f"{amount:.2f}", "currencyCode": "USD"}


def cart_input(lines: int) -> dict[str, Any]:
    """A host's full input: ``lines`` cart lines with full product data."""
    out = []
    for i in range(lines):
        price = 5 + (i % 17) * 1.25
        quantity = 1 + i % 4
        tags = ["summer", f"size-{i % 5}"] + (["sale"] if i % 3 == 0 else [])
        product = {
            "id": f"gid://shopify/Product/{1000 + i}",
            "handle": f"product-{i}",
            "title": f"T-shirt {i}",
            "vendor": "Acme",
            "productType": "T-shirts",
            "description": "Organic cotton.",
            "tags": tags,
            "isGiftCard": False,
            "hasAnyTag": lambda tags, _t=tuple(tags): any(t in _t for t in tags),
            "variants": [
                {"id": f"gid://shopify/ProductVariant/{i}{v}", "title": size, "sku": f"TS-{i}-{size}"}
                for v, size in enumerate(["S"])
            ],
        }
        out.append(
            {
                "id": f"gid://shopify/CartLine/{i}",
                "quantity": quantity,
                "attribute": {"key": "note", "value": "Gift" if i % 7 == 0 else None},
                "merchandise": {
                    "__typename": "ProductVariant",
                    "id": f"gid://shopify/ProductVariant/{i}",
                    "sku": f"TS-{i}-M",
                    "title": "M",
                    "requiresShipping": True,
                    "weight": 0.2,
                    "product": product,
                },
                "cost": {
                    "amountPerQuantity": money(price),
                    "totalAmount": money(price * quantity),
                },
            }
        )
    return {
        "cart": {
            "lines": out,
            "attribute": None,
            "buyerIdentity": {
                "customer": {
                    "id": "gid://shopify/Customer/7",
                    "email": "ada@example.com",
                    "displayName": "Ada Lovelace",
                    "numberOfOrders": 12,
                    "amountSpent": money(1234.5),
                },
                "email": "ada@example.com",
                "phone": "+15555550123",
                "isAuthenticated": True,
            },
            "cost": {"subtotalAmount": money(999.0), "totalAmount": money(999.0)},
        },
        "discountNode": {
            "metafield": lambda namespace, key: {"jsonValue": {"percentage": 10, "minimumQuantity": 2}}
        },
        "presentmentCurrencyRate": "1.0",
        "shop": {"metafield": None},
    }


def for_graphql(value: Any) -> Any:
    """The same input for graphql-core's default resolver, which calls a callable with the
    resolve info first."""
    if isinstance(value, dict):
        return {k: for_graphql(v) for k, v in value.items()}
    if isinstance(value, list):
        return [for_graphql(v) for v in value]
    if callable(value):
        return lambda _info, __f=value, **kw: __f(**kw)
    return value


def plain(value: Any) -> Any:
    """The input as JSON would carry it: loaders replaced by what they return for the query."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# A script that reads its whole input (in 4 KiB reads) and prints {}: the run costs what reading
# the input costs, so the end-to-end figures show what the input's size does to a call.
DRAIN_WAT = """
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


def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    """Calls through a real worker (solo pool, one shard, a private Redis): the same cart sent
    whole to a script deployed without a query, and sent through the query to one deployed with
    it; then the loader case, where every line's product and the buyer come from loaders and
    the query selects none of them. p50/p95 of ``Outcome.timings.total_ms``, interleaved."""
    import os
    import secrets
    import subprocess
    import sys
    import tempfile

    import redis
    import wasmtime

    sys.path.insert(0, str(ROOT))
    from scriptpool.config import Settings
    from scriptpool.engine import Sandbox
    from scriptpool.producer import Client
    from scriptpool.registry import Registry
    from scriptpool.testing import EmbeddedRedis, worker_argv

    key = secrets.token_hex(32)
    drain = bytes(wasmtime.wat2wasm(DRAIN_WAT))
    host = cart_input(args.lines)
    full = plain(host)
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=key.encode(), shards=1)
        registry = Registry(redis.Redis.from_url(server.url), settings, Sandbox())
        registry.define_extension_point("whole", limits={"input_bytes": 1 << 20})
        registry.define_extension_point(
            "queried", limits={"input_bytes": 1 << 20}, input_graphql=SCHEMA.read_text()
        )
        registry.deploy("whole", "1", drain)
        registry.deploy("queried", "1", drain, input_query=QUERY)
        env = dict(
            os.environ, SCRIPTPOOL_REDIS_URL=server.url, SCRIPTPOOL_ARTIFACT_KEY=key, SCRIPTPOOL_SHARDS="1"
        )
        env["PYTHONPATH"] = str(ROOT)
        log = Path(tempfile.mkdtemp()) / "worker.log"
        argv = worker_argv(settings, [0], name="bench-iq@%h", pool="solo")
        proc = subprocess.Popen([*argv, "--logfile", str(log)], env=env, cwd=ROOT)
        try:
            with Client(settings) as client:
                deadline = time.monotonic() + 30
                while not client.run("whole", "1", {}, timeout=1).ok:
                    assert time.monotonic() < deadline, log.read_text()
                calls: dict[str, list[float]] = {"full": [], "query": [], "query_loaders": []}
                loaded = {"count": 0}

                def with_loaders() -> dict[str, Any]:
                    # Every line's product, and the buyer, behind loaders that cost 0.2 ms each
                    # (a cache read's worth): the query selects none of them.
                    value = cart_input(args.lines)
                    for line in value["cart"]["lines"]:
                        product = line["merchandise"].pop("product")
                        line["merchandise"]["product"] = _slow_loader(product, loaded)
                    value["cart"]["buyerIdentity"] = _slow_loader(value["cart"]["buyerIdentity"], loaded)
                    return value

                light_query = (
                    "query { cart { lines { quantity merchandise { ... on ProductVariant { id } } } } }"
                )
                registry.deploy("queried", "2", drain, input_query=light_query)
                for name, ep, shop in (("full", "whole", "1"), ("query", "queried", "1")):
                    for _ in range(50):  # warm: module hot, plan compiled, bindings cached
                        client.run(ep, shop, full if name == "full" else host, timeout=5)
                for _ in range(20):
                    client.run("queried", "2", with_loaders(), timeout=5)
                loaded["count"] = 0
                for _ in range(args.calls):
                    for name, ep, shop, value in (
                        ("full", "whole", "1", full),
                        ("query", "queried", "1", host),
                        ("query_loaders", "queried", "2", with_loaders()),
                    ):
                        outcome = client.run(ep, shop, value, timeout=5)
                        assert outcome.ok, outcome
                        calls[name].append(outcome.timings.total_ms)
                sizes = {
                    "full_bytes": len(json.dumps(full, separators=(",", ":"))),
                    "projected_bytes": len(
                        json.dumps(
                            InputQuery.compile(InputSchema.from_sdl(SCHEMA.read_text()), QUERY).project(host),
                            separators=(",", ":"),
                        )
                    ),
                }
        finally:
            proc.terminate()
            proc.wait()

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {
        "lines": args.lines,
        "calls": args.calls,
        **sizes,
        **{f"{name}_p50_ms": pct(v, 0.5) for name, v in calls.items()},
        **{f"{name}_p95_ms": pct(v, 0.95) for name, v in calls.items()},
        "unselected_loaders_called": loaded["count"],
    }


def _slow_loader(value: Any, counter: dict[str, int]) -> Any:
    def load() -> Any:
        counter["count"] += 1
        time.sleep(0.0002)
        return value

    return load


def main() -> None:
    """Measure and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument(
        "--end-to-end", action="store_true", help="calls through a real worker instead (see end_to_end)"
    )
    parser.add_argument("--calls", type=int, default=300, help="calls per case with --end-to-end")
    args = parser.parse_args()
    if args.end_to_end:
        print(json.dumps(end_to_end(args), indent=2))
        return

    schema = InputSchema.from_sdl(SCHEMA.read_text())
    query = InputQuery.compile(schema, QUERY)
    plan = query.plan()
    host = cart_input(args.lines)
    graphql_host = for_graphql(host)
    full = plain(host)

    times: dict[str, list[float]] = {
        k: [] for k in ("projection", "graphql", "dumps_full", "dumps_projected")
    }
    projected: Any = None
    executed: Any = None
    for _ in range(args.runs):
        t0 = time.perf_counter()
        projected = plan.project(host)
        t1 = time.perf_counter()
        executed = execute_sync(schema.schema, query.document, root_value=graphql_host)
        t2 = time.perf_counter()
        json.dumps(full)
        t3 = time.perf_counter()
        json.dumps(projected)
        t4 = time.perf_counter()
        times["projection"].append(t1 - t0)
        times["graphql"].append(t2 - t1)
        times["dumps_full"].append(t3 - t2)
        times["dumps_projected"].append(t4 - t3)

    def ms(key: str) -> float:
        return round(statistics.median(times[key]) * 1000, 3)

    print(
        json.dumps(
            {
                "lines": args.lines,
                "runs": args.runs,
                "query_cost": query.cost,
                "full_bytes": len(json.dumps(full, separators=(",", ":"))),
                "projected_bytes": len(json.dumps(projected, separators=(",", ":"))),
                "projection_ms": ms("projection"),
                "graphql_execute_ms": ms("graphql"),
                "dumps_full_ms": ms("dumps_full"),
                "dumps_projected_ms": ms("dumps_projected"),
                "same_result": executed.errors is None and executed.data == projected,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
