"""The ``scriptpool`` command line. User mistakes print one line and exit non-zero."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import redis

from config import Settings, configure_logging, redis_client
from config.errors import ScriptpoolError
from scriptpool._files import UserMistake, read_json, read_module

EXIT_USAGE, EXIT_FAILED = 2, 1


def _registry(settings: Settings) -> Any:
    from engine import Sandbox
    from registry import Registry

    return Registry(redis_client(settings.redis_url, timeout=5, connect_timeout=2), settings, Sandbox())


def cmd_deploy(args: argparse.Namespace, settings: Settings) -> int:
    deployment = _registry(settings).deploy(args.ep, args.shop, read_module(args.module), export=args.export)
    print(
        f"deployed {args.module} to {deployment.ep}/{deployment.shop_id} "
        f"as version {deployment.version} (sha256 {deployment.sha256[:12]})"
    )
    return 0


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    deployment = _registry(settings).rollback(args.ep, args.shop)
    print(f"rolled back {deployment.ep}/{deployment.shop_id} to version {deployment.version}")
    return 0


def cmd_providers_add(args: argparse.Namespace, settings: Settings) -> int:
    provider = _registry(settings).add_provider(args.name, read_module(args.module))
    print(f"installed provider {provider.name} (sha256 {provider.sha256[:12]})")
    return 0


def cmd_ep_define(args: argparse.Namespace, settings: Settings) -> int:
    limits = json.loads(args.limits) if args.limits else None
    _registry(settings).define_extension_point(
        args.name,
        limits=limits,
        input_schema=read_json(args.input_schema),
        output_schema=read_json(args.output_schema),
        input_validation_rate=args.input_validation_rate,
    )
    print(f"defined extension point {args.name}")
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from producer import Client

    payload = read_json(args.input) if args.input else {}
    with Client(settings) as client:
        outcome = client.run(args.ep, args.shop, payload, timeout=args.timeout_ms / 1000)
    if outcome.error_code == "broker_unavailable":
        raise redis.ConnectionError(outcome.error.message if outcome.error else "broker unavailable")
    if args.json:
        print(json.dumps(outcome.to_dict(), indent=2, default=str))
    else:
        _print_outcome(outcome)
    return 0 if outcome.ok else EXIT_FAILED


def _print_outcome(outcome: Any) -> None:
    where = f"shard {outcome.shard}, worker {outcome.worker}" if outcome.worker else f"shard {outcome.shard}"
    print(f"status:  {outcome.status}  ({where})")
    if outcome.ok:
        print(f"output:  {json.dumps(outcome.output)}")
    else:
        message = outcome.error.message if outcome.error else ""
        print(f"error:   {outcome.error_code}: {message}")
    report = outcome.report
    if report is not None:
        print(
            f"report:  {report.instructions:,} instructions, {report.peak_memory_bytes:,} B peak memory, "
            f"{report.input_bytes:,} B in, {report.output_bytes:,} B out, module {report.module_source}"
        )
        if report.logs:
            print("logs:    " + report.logs.rstrip().replace("\n", "\n         "))
    t = outcome.timings
    print(
        f"timings: enqueue {t.enqueue_ms:.2f} ms | queue wait {t.queue_wait_ms:.2f} | "
        f"execute {t.execute_ms:.2f} | result {t.result_ms:.2f} | total {t.total_ms:.2f} ms"
    )


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool._table import LiveTable

    client = redis_client(settings.redis_url, timeout=5, connect_timeout=2)
    keys = settings.keys
    heartbeats = [json.loads(raw) for raw in client.mget(sorted(client.keys(keys.workers_pattern()))) if raw]
    where = settings.redis_url.split("@")[-1]
    print(f"redis {where}  shards {settings.shards}  live workers {len(heartbeats)}")
    table = LiveTable(
        [
            ("shard", 5),
            ("queue depth", 11),
            ("worker", 36),
            ("executed", 9),
            ("dropped", 7),
            ("modules", 7),
            ("cache hit %", 11),
        ]
    )
    for shard in range(settings.shards):
        depth = client.llen(keys.queue(shard))
        serving = [h for h in heartbeats if shard in h["shards"]]
        if not serving:
            table.row(shard, depth, "NONE: callers get fallbacks", None, None, None, None)
        for beat in serving:
            cache = beat["cache"]
            lookups = cache["hits"] + cache["misses"]
            ratio = 100.0 * cache["hits"] / lookups if lookups else None
            table.row(
                shard, depth, beat["name"], beat["executed"], beat["dropped_stale"], cache["entries"], ratio
            )
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool._bench import BenchOptions, run_bench

    if min(args.n, args.concurrency, args.shards, args.serial, args.references) < 1:
        raise UserMistake("--n, --concurrency, --shards, --serial and --references must be at least 1")
    if args.duration < 0:
        raise UserMistake("--duration must not be negative")
    return run_bench(
        BenchOptions(
            n=args.n,
            concurrency=args.concurrency,
            shards=args.shards,
            serial=args.serial,
            references=args.references,
            external=args.external,
            json_path=args.json,
            duration=args.duration,
            use_asyncio=args.use_asyncio,
        )
    )


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool._demo import run_demo

    return run_demo(external=args.external)


def parse_shards(text: str, shards: int) -> list[int]:
    """Parse ``0,2`` (or ``all``) into shard numbers that exist under the current settings."""
    if text == "all":
        return list(range(shards))
    try:
        chosen = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserMistake(f"--shards takes numbers like 0,1 or 'all', got {text!r}") from None
    bad = [n for n in chosen if not 0 <= n < shards]
    if not chosen or bad:
        raise UserMistake(f"--shards must name shards in 0..{shards - 1} (SCRIPTPOOL_SHARDS={shards})")
    return chosen


def worker_argv(
    settings: Settings,
    shards: list[int],
    *,
    name: str | None = None,
    loglevel: str = "INFO",
    events: bool = False,
    pool: str = "solo",
) -> list[str]:
    """The plain Celery command line a shard worker runs."""
    queues = ",".join(settings.keys.queue(n) for n in shards)
    node = name or f"shard{'-'.join(map(str, shards))}-{os.getpid()}@%h"
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers",
        "worker",
        "-Q",
        queues,
        "-n",
        node,
        "--pool",
        pool,
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if events:
        argv.append("--events")
    return argv


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    settings.require_artifact_key()
    if args.metrics_port is not None:
        os.environ["SCRIPTPOOL_METRICS_PORT"] = str(args.metrics_port)
    argv = worker_argv(
        settings,
        parse_shards(args.shards, settings.shards),
        name=args.name,
        loglevel=args.loglevel,
        events=args.events,
    )
    os.execv(argv[0], argv)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scriptpool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    deploy = sub.add_parser("deploy", help="validate, compile and bind a module")
    deploy.add_argument("ep")
    deploy.add_argument("shop")
    deploy.add_argument("module", metavar="MODULE.wasm")
    deploy.add_argument("--export", default="_start")
    deploy.set_defaults(func=cmd_deploy)

    rollback = sub.add_parser("rollback", help="rebind the previous version")
    rollback.add_argument("ep")
    rollback.add_argument("shop")
    rollback.set_defaults(func=cmd_rollback)

    providers = sub.add_parser("providers", help="manage provider modules")
    providers_sub = providers.add_subparsers(dest="providers_command", required=True)
    add = providers_sub.add_parser("add", help="install a provider")
    add.add_argument("name")
    add.add_argument("module", metavar="MODULE.wasm")
    add.set_defaults(func=cmd_providers_add)

    run = sub.add_parser("run", help="run a script through the pool and print its outcome")
    run.add_argument("ep")
    run.add_argument("shop")
    run.add_argument("--input", metavar="FILE|-", help="JSON input (default {})")
    run.add_argument("--timeout-ms", type=float, default=1000.0)
    run.add_argument("--json", action="store_true", help="print the whole outcome as one JSON object")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="shards, live workers, queue depths and cache hit ratios")
    status.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", help="start Redis and two workers, deploy and run the examples")
    demo.add_argument("--external", action="store_true", help="use the running Redis and workers")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="stage table against the floor, in-process and naive Celery")
    bench.add_argument("--n", type=int, default=2000, help="executions in the concurrent run")
    bench.add_argument(
        "--duration", type=float, default=0.0, help="run the concurrent phase this many seconds instead"
    )
    bench.add_argument(
        "--asyncio",
        dest="use_asyncio",
        action="store_true",
        help="concurrent callers are asyncio tasks (run_async) instead of threads",
    )
    bench.add_argument("--concurrency", type=int, default=4)
    bench.add_argument("--shards", type=int, default=2, help="shards to start (unless --external)")
    bench.add_argument("--serial", type=int, default=1000, help="serial executions for latency")
    bench.add_argument("--references", type=int, default=500, help="calls per reference point")
    bench.add_argument("--external", action="store_true", help="use the running Redis and workers")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.set_defaults(func=cmd_bench)

    worker = sub.add_parser("worker", help="run a Celery worker for some shards")
    worker.add_argument("--shards", required=True, help="comma-separated shard numbers, or 'all'")
    worker.add_argument("--name", help="Celery node name (default shard<N>-<pid>@<host>)")
    worker.add_argument("--loglevel", default="INFO", help="INFO logs one JSON event per execution")
    worker.add_argument("--events", action="store_true", help="send task events (for Flower)")
    worker.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    worker.set_defaults(func=cmd_worker)

    ep = sub.add_parser("ep", help="manage extension points")
    ep_sub = ep.add_subparsers(dest="ep_command", required=True)
    define = ep_sub.add_parser("define", help="create or replace an extension point")
    define.add_argument("name")
    define.add_argument("--limits", help='JSON object of limit overrides, e.g. {"fuel": 5000000}')
    define.add_argument("--input-schema", metavar="FILE")
    define.add_argument("--output-schema", metavar="FILE")
    define.add_argument("--input-validation-rate", type=float)
    define.set_defaults(func=cmd_ep_define)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The CLI prints its own summaries; only warnings and security events need the logger.
    configure_logging(json=False, level=logging.WARNING)
    logging.getLogger("scriptpool.client").setLevel(logging.ERROR)  # reconnect chatter
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    try:
        return func(args, Settings.from_env())
    except (UserMistake, ScriptpoolError) as exc:
        code = getattr(exc, "code", "error")
        print(f"scriptpool: {code}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        print(f"scriptpool: cannot reach Redis at {_redis_address()}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _redis_address() -> str:
    url = os.environ.get("SCRIPTPOOL_REDIS_URL", Settings().redis_url)
    return url.split("@")[-1]
