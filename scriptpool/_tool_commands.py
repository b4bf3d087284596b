"""The demo and the benchmark: each brings up a pool of its own, or borrows a running one."""

from __future__ import annotations

import argparse
from typing import Any

from config import Settings
from config.errors import InvalidArgument
from scriptpool._output import add_json_flag


def add_parsers(sub: Any) -> None:
    demo = sub.add_parser("demo", help="start a private Redis and two workers, deploy and run the examples")
    demo.add_argument(
        "--external",
        action="store_true",
        help="use the Redis in SCRIPTPOOL_REDIS_URL and its running workers, under names of the demo's "
        "own that it removes afterwards",
    )
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser(
        "bench", help="stage table of the pool against the floor, in-process and naive Celery"
    )
    bench.add_argument("--n", type=int, default=2000, help="executions in the concurrent run (default 2000)")
    bench.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="run the concurrent phase this many seconds instead of --n",
    )
    bench.add_argument(
        "--asyncio",
        dest="use_asyncio",
        action="store_true",
        help="concurrent callers are asyncio tasks (run_async) instead of threads",
    )
    bench.add_argument("--concurrency", type=int, default=4, help="concurrent callers (default 4)")
    bench.add_argument("--shards", type=int, default=2, help="shards to start, unless --external (default 2)")
    bench.add_argument(
        "--serial", type=int, default=1000, help="serial executions for latency (default 1000)"
    )
    bench.add_argument("--references", type=int, default=500, help="calls per reference point (default 500)")
    bench.add_argument(
        "--external",
        action="store_true",
        help="use the Redis in SCRIPTPOOL_REDIS_URL and its running workers (no naive reference)",
    )
    add_json_flag(bench)
    bench.set_defaults(func=cmd_bench)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool._demo import run_demo

    return run_demo(external=args.external)


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool._bench import BenchOptions, run_bench

    if min(args.n, args.concurrency, args.shards, args.serial, args.references) < 1:
        raise InvalidArgument("--n, --concurrency, --shards, --serial and --references must be at least 1")
    if not args.duration >= 0:
        raise InvalidArgument("--duration must be a number of seconds, 0 or more")
    return run_bench(
        BenchOptions(
            n=args.n,
            concurrency=args.concurrency,
            shards=args.shards,
            serial=args.serial,
            references=args.references,
            external=args.external,
            json_output=args.json,
            duration=args.duration,
            use_asyncio=args.use_asyncio,
        )
    )
