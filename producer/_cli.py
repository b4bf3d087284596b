"""The ``scriptpool`` command line. User mistakes print one line and exit non-zero."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from config import Settings
from config.errors import ScriptpoolError

EXIT_USAGE, EXIT_FAILED = 2, 1


class UserMistake(Exception):
    """Raised for a mistake the user can fix (a missing file, bad JSON); printed as one line."""


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserMistake(f"cannot read {path}: {exc.strerror}") from None


def _read_json(path: str | None) -> Any:
    if path is None:
        return None
    raw = sys.stdin.buffer.read() if path == "-" else _read_file(path)
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise UserMistake(f"{path} is not JSON: {exc}") from None


def _registry(settings: Settings) -> Any:
    from registry import Registry
    from workers import Sandbox

    return Registry(redis.Redis.from_url(settings.redis_url, socket_timeout=5), settings, Sandbox())


def cmd_deploy(args: argparse.Namespace, settings: Settings) -> int:
    deployment = _registry(settings).deploy(args.ep, args.shop, _read_file(args.module), export=args.export)
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
    provider = _registry(settings).add_provider(args.name, _read_file(args.module))
    print(f"installed provider {provider.name} (sha256 {provider.sha256[:12]})")
    return 0


def cmd_ep_define(args: argparse.Namespace, settings: Settings) -> int:
    limits = json.loads(args.limits) if args.limits else None
    _registry(settings).define_extension_point(
        args.name,
        limits=limits,
        input_schema=_read_json(args.input_schema),
        output_schema=_read_json(args.output_schema),
        input_validation_rate=args.input_validation_rate,
    )
    print(f"defined extension point {args.name}")
    return 0


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
    loglevel: str = "WARNING",
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

    worker = sub.add_parser("worker", help="run a Celery worker for some shards")
    worker.add_argument("--shards", required=True, help="comma-separated shard numbers, or 'all'")
    worker.add_argument("--name", help="Celery node name (default shard<N>-<pid>@<host>)")
    worker.add_argument("--loglevel", default="WARNING", help="Celery log level (INFO logs every task)")
    worker.add_argument("--events", action="store_true", help="send task events (for Flower)")
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
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    try:
        return func(args, Settings.from_env())
    except (UserMistake, ScriptpoolError) as exc:
        code = getattr(exc, "code", "error")
        print(f"scriptpool: {code}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except redis.ConnectionError as exc:
        print(f"scriptpool: cannot reach Redis: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
