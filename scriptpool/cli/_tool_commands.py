"""The demo and the benchmark: each brings up a pool of its own, or borrows a running one; and
``key generate``, the artifact key a pool signs with."""

from __future__ import annotations

import argparse
import os
import secrets
from typing import Any

from scriptpool.cli._output import ExitCode, add_json_flag
from scriptpool.config import Settings
from scriptpool.config.errors import ConfigurationError, InvalidArgument
from scriptpool.config.settings import artifact_key_problem, read_key_file


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

    key = sub.add_parser("key", help="the artifact key that deploys sign and workers verify with")
    key_sub = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    generate = key_sub.add_parser(
        "generate", help="print a new random key (64 hex digits) for SCRIPTPOOL_ARTIFACT_KEY"
    )
    generate.add_argument(
        "--file",
        metavar="PATH",
        help="write it to PATH instead (mode 0600), for SCRIPTPOOL_ARTIFACT_KEY_FILE; a valid key "
        "already there is kept, so every start of a stack uses the same one",
    )
    generate.set_defaults(func=cmd_key_generate)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.cli._demo import run_demo

    return run_demo(external=args.external)


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.cli._bench import BenchOptions, run_bench

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


def cmd_key_generate(args: argparse.Namespace, settings: Settings) -> int:
    # 32 random bytes as hex: 64 bytes of key text, printable in any environment file.
    key = secrets.token_hex(32)
    if args.file is None:
        print(key)
        return ExitCode.OK
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Kept only if it is a key we would use: a bad one is reported, never silently replaced
        # (a file someone wrote on purpose) nor silently used.
        problem = artifact_key_problem(read_key_file(args.file))
        if problem is not None:
            raise ConfigurationError(
                f"the key in {args.file} {problem}: remove the file and run this again for a new "
                "one (workers recompile what the old key signed)",
                variable="SCRIPTPOOL_ARTIFACT_KEY_FILE",
            ) from None
        print(f"kept the artifact key in {args.file}")
        return ExitCode.OK
    except OSError as exc:
        raise ConfigurationError(f"cannot write a key to {args.file}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
    print(f"wrote a new artifact key to {args.file}")
    return ExitCode.OK
