"""The cost of an input query's projection per call, against the alternatives.

Run: .venv/bin/python scripts/bench_input_query.py [--runs 300] [--lines 200]
Prints one JSON object. The input: a cart of ``--lines`` lines in the style of Shopify's cart
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


def main() -> None:
    """Measure and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--lines", type=int, default=200)
    args = parser.parse_args()

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
