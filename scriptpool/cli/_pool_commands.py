"""Commands on the pool: run a script through it, see its state, start a shard worker."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from scriptpool.cli import _local_commands
from scriptpool.cli._files import read_json
from scriptpool.cli._output import ExitCode, add_json_flag, dumps, exit_code_for, print_json, report
from scriptpool.cli._status import cmd_status
from scriptpool.config import Settings
from scriptpool.config.errors import ConfigurationError, InputTooLarge, InvalidArgument
from scriptpool.config.redis import describe_redis_url

if TYPE_CHECKING:
    from scriptpool.producer import Outcome

# A caller's deadline in ms, as the client accepts it: (0, 600 s].
MAX_TIMEOUT_MS = 600_000
# What the run itself still gets when reading the EP's limits took the whole deadline.
_LEAST_TIMEOUT_S = 0.001
# An input file may hold whitespace: it is read up to this many times the EP's input limit, and
# the minified JSON is then held to the limit itself.
INPUT_TEXT_FACTOR = 4


def add_parsers(sub: Any) -> None:
    run = sub.add_parser(
        "run", help="run a script through the pool and print its outcome (or, with --local, a module here)"
    )
    run.add_argument("ep", nargs="?", help="extension point (not with --local)")
    run.add_argument("shop", nargs="?", help="shop id (not with --local)")
    run.add_argument(
        "--input",
        metavar="FILE|-",
        help="JSON input, a file or - for stdin (default {}; needed with --local)",
    )
    run.add_argument(
        "--timeout-ms",
        type=float,
        metavar="MS",
        help="the caller's deadline in ms, in (0, 600000] (default SCRIPTPOOL_DEADLINE_MS)",
    )
    run.add_argument(
        "--session",
        metavar="TOKEN",
        help="the buyer's session token (1 to 256 printable characters): scripts read and write "
        "its SESSION data within the shop",
    )
    run.add_argument(
        "--trace",
        action="store_true",
        help="also print the call's OpenTelemetry trace as a tree of stages and durations "
        "(needs scriptpool[otel])",
    )
    _local_commands.add_arguments(run)
    add_json_flag(run)
    run.set_defaults(func=cmd_run)

    status = sub.add_parser(
        "status", help="shard groups, shards, live workers, queue depths, cache hit ratios, registry gaps"
    )
    status.add_argument("ep", nargs="?", help="with SHOP: also where this (EP, shop) runs and its apps")
    status.add_argument("shop", nargs="?", help="shop id (with EP)")
    add_json_flag(status)
    status.set_defaults(func=cmd_status)

    worker = sub.add_parser("worker", help="run a Celery worker for some shards (plain `celery worker`)")
    worker.add_argument("--shards", required=True, help="comma-separated shard numbers, or 'all'")
    worker.add_argument(
        "--name", help="worker name, unique among live workers (default shard<N>-<pid>@<host>)"
    )
    worker.add_argument("--loglevel", default="INFO", help="INFO logs one JSON event per execution (default)")
    worker.add_argument("--events", action="store_true", help="send Celery events, for Flower")
    worker.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus /metrics on this port (default SCRIPTPOOL_METRICS_PORT; 0 = off)",
    )
    worker.set_defaults(func=cmd_worker)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    if args.local is not None:
        if args.trace:
            raise InvalidArgument("--trace goes with a run through the pool, not with --local")
        return _local_commands.cmd_run_local(args, settings)
    import redis

    from scriptpool.producer import Client

    if args.ep is None or args.shop is None:
        raise InvalidArgument("run needs EP SHOP (or --local MODULE to run a module in this process)")
    local_only = [flag for flag, given in (("--ep", args.limits_ep), ("--provider", args.provider),
                  ("--profile", args.profile), ("--export", args.export != "_start")) if given]  # fmt: skip
    if local_only:
        raise InvalidArgument(f"{', '.join(local_only)} go with --local MODULE only")

    timeout_ms = settings.default_deadline_ms if args.timeout_ms is None else args.timeout_ms
    if not 0 < timeout_ms <= MAX_TIMEOUT_MS:  # NaN fails this too
        raise InvalidArgument(
            f"--timeout-ms must be a number of milliseconds in (0, {MAX_TIMEOUT_MS}], got {timeout_ms}"
        )
    deadline_s = timeout_ms / 1000
    spans = None
    if args.trace:  # before the client: it looks for a tracer provider when it is made
        from scriptpool.cli._trace_tree import start_tracing

        spans = start_tracing()
    with Client(settings) as client:
        # Reading the EP's limits (how much input to read) waits at most the deadline; if Redis
        # did not answer by then, the run gets only what is left of it, so on a Redis that does
        # not answer the command still answers in about --timeout-ms.
        asked = time.monotonic()
        run_timeout = deadline_s
        try:
            limits = client.limits(args.ep, timeout=deadline_s)
        except (redis.RedisError, OSError) as exc:
            if isinstance(exc, redis.AuthenticationError):
                raise  # Redis answered and wants its password: said so, not a fallback
            payload: Any = {}  # Redis is down: the run below answers with its fallback outcome
            run_timeout = max(deadline_s - (time.monotonic() - asked), _LEAST_TIMEOUT_S)
        else:
            limit = INPUT_TEXT_FACTOR * limits.input_bytes
            payload = read_json(args.input, limit, InputTooLarge, "input") if args.input else {}
        outcome = client.run(args.ep, args.shop, payload, timeout=run_timeout, session=args.session)
    exit_code = exit_code_for(outcome.error_code)
    tree = None
    if spans is not None:
        from scriptpool.cli._trace_tree import call_tree

        tree = call_tree(spans, outcome)
    if args.json:
        shown = outcome.to_dict()
        if tree is not None:
            from scriptpool.cli._trace_tree import as_json

            shown["trace"] = as_json(*tree)
        print_json(shown)
    elif exit_code == ExitCode.UNREACHABLE:
        from scriptpool.config.errors import BrokerUnavailable

        message = outcome.error.message if outcome.error else ""
        group = settings.group_of(outcome.shard) if outcome.shard is not None else settings.groups[0]
        return report(
            BrokerUnavailable(f"cannot reach Redis at {describe_redis_url(group.url)}: {message}"),
            exit_code,
            json_output=False,
        )
    else:
        _print_outcome(outcome)
        if tree is not None:
            from scriptpool.cli._trace_tree import render

            print("\n".join(render(*tree)))
    return exit_code


def _print_outcome(outcome: Outcome) -> None:
    where = f"shard {outcome.shard}, worker {outcome.worker}" if outcome.worker else f"shard {outcome.shard}"
    print(f"status:  {outcome.status}  ({where})")

    if outcome.ok:
        print(f"output:  {dumps(outcome.output)}")
    else:
        message = outcome.error.message if outcome.error else ""
        print(f"error:   {outcome.error_code}: {message}")
    for part in outcome.parts:
        code = f" {part.error.code}" if part.error else ""
        cost = f"{part.report.instructions:,} instructions"
        print(f"part:    app {part.app} v{part.version}: {part.status}{code}, {cost}")
    report_ = outcome.report
    if report_ is not None:
        # No module was loaded when there was no script to run: nothing to say where it came from.
        source = f", module {report_.module_source}" if report_.module_source else ""
        print(
            f"report:  {report_.instructions:,} instructions, {report_.peak_memory_bytes:,} B peak memory, "
            f"{report_.input_bytes:,} B in, {report_.output_bytes:,} B out{source}"
        )
        if report_.logs:
            print("logs:    " + report_.logs.rstrip().replace("\n", "\n         "))
    t = outcome.timings
    print(
        f"timings: enqueue {t.enqueue_ms:.2f} ms | queue wait {t.queue_wait_ms:.2f} | "
        f"execute {t.execute_ms:.2f} | result {t.result_ms:.2f} | total {t.total_ms:.2f} ms"
    )


def parse_shards(text: str, shards: int) -> list[int]:
    """Parse ``0,2`` (or ``all``) into shard numbers that exist under the current settings."""
    if text == "all":
        return list(range(shards))
    try:
        chosen = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise InvalidArgument(f"--shards takes numbers like 0,1 or 'all', got {text!r}") from None
    bad = [n for n in chosen if not 0 <= n < shards]
    if not chosen or bad:
        raise InvalidArgument(f"--shards must name shards in 0..{shards - 1} (SCRIPTPOOL_SHARDS={shards})")
    return chosen


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.workers import worker_argv  # here: run and status load no worker side

    settings.require_artifact_key()
    shards = parse_shards(args.shards, settings.shards)
    settings.group_of_shards(shards)  # one group's Redis per worker (the worker checks again)
    port = settings.metrics_port if args.metrics_port is None else args.metrics_port
    if port:
        _check_port_free(port)
        os.environ["SCRIPTPOOL_METRICS_PORT"] = str(port)
    argv = worker_argv(settings, shards, name=args.name, loglevel=args.loglevel, events=args.events)
    sys.stdout.flush()
    os.execv(argv[0], argv)
    return ExitCode.OK  # not reached


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is in 0..65535, got {port}")
    return port


def _check_port_free(port: int) -> None:
    """Refuse to start a worker whose metrics port cannot be opened (the worker would too)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as exc:
            raise ConfigurationError(f"cannot serve metrics on port {port}: {exc.strerror or exc}") from None
