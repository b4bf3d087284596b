"""Captured runs: list them, show one, replay one in this process (``runs``, ``replay``)."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from scriptpool.cli._files import read_module
from scriptpool.cli._output import ExitCode, add_json_flag, dumps, exit_code_for, print_json
from scriptpool.config import Limits, Settings, shard_for
from scriptpool.config.errors import InvalidArgument, RunNotFound
from scriptpool.config.redis import redis_client

if TYPE_CHECKING:
    from scriptpool.runtime import CapturedRun, CaptureStore, Replayed

# Input, output and logs longer than this are cut in the text views (--json shows them whole).
SHOWN_CHARS = 2000


def add_parsers(sub: Any) -> None:
    runs = sub.add_parser("runs", help="runs the workers captured: every failed one, and sampled successes")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    listing = runs_sub.add_parser("list", help="captured runs, newest first")
    listing.add_argument("ep", nargs="?", help="only this extension point's runs")
    listing.add_argument("shop", nargs="?", help="only this shop's runs (with EP)")
    listing.add_argument("--status", choices=("ok", "error"), help="only runs that succeeded, or failed")
    listing.add_argument("--limit", type=int, default=50, metavar="N", help="at most N runs (default 50)")
    add_json_flag(listing)
    listing.set_defaults(func=cmd_runs_list)
    show = runs_sub.add_parser("show", help="one captured run: input, outcome, report, logs and limits")
    show.add_argument("run_id", metavar="RUN_ID", help="the run's id, as `runs list` shows it")
    add_json_flag(show)
    show.set_defaults(func=cmd_runs_show)

    delete = runs_sub.add_parser("delete", help="delete captured runs now (they also expire by themselves)")
    delete.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to delete")
    delete.add_argument("--shop", help="delete every captured run of this shop")
    add_json_flag(delete)
    delete.set_defaults(func=cmd_runs_delete)

    replay = sub.add_parser(
        "replay",
        help="run a captured run again in this process, on the same module version, input and limits, "
        "and say whether output, error code and instruction count are identical",
    )
    replay.add_argument("run_id", metavar="RUN_ID", help="the run's id, as `runs list` shows it")
    replay.add_argument(
        "--module",
        metavar="FILE",
        help="run this module (.wasm or .wat, checked as a deploy checks it) instead of the recorded "
        "version: how a fix is tried on the exact input that failed",
    )
    add_json_flag(replay)
    replay.set_defaults(func=cmd_replay)


def _stores(settings: Settings, shop_id: str | None = None) -> list[CaptureStore]:
    """The capture store of every shard group (a worker captures into its own group's Redis),
    or of ``shop_id``'s group only."""
    from scriptpool.runtime import CaptureStore

    groups = [settings.group_of(shard_for(shop_id, settings.shards))] if shop_id else settings.groups
    return [CaptureStore(redis_client(g.url, timeout=5, connect_timeout=2), settings) for g in groups]


def _find(settings: Settings, run_id: str) -> CapturedRun:
    """The captured run ``run_id``, from whichever group holds it."""
    missing: RunNotFound | None = None
    for store in _stores(settings):
        try:
            return store.get(run_id)
        except RunNotFound as exc:
            missing = missing or exc
    assert missing is not None
    raise missing


def cmd_runs_list(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.config import check_ep, check_shop_id

    if args.ep is not None:
        check_ep(args.ep)
    if args.shop is not None:
        check_shop_id(args.shop)
    if not 1 <= args.limit <= 10_000:
        raise InvalidArgument(f"--limit must be in 1..10000, got {args.limit}")
    found = sorted(
        (
            summary
            for store in _stores(settings, args.shop)
            for summary in store.summaries(
                ep=args.ep, shop_id=args.shop, status=args.status, limit=args.limit
            )
        ),
        key=lambda summary: summary.captured_at,
        reverse=True,
    )[: args.limit]
    rows = [
        {
            "id": s.id,
            "captured": _when(s.captured_at),
            "ep": s.ep,
            "shop": s.shop_id,
            "app": s.app,
            "version": s.version,
            "status": s.status,
            "error_code": s.error_code,
            "instructions": s.instructions,
            "input_bytes": s.input_bytes,
            "expires": _when(s.expires_at),
        }
        for s in found
    ]
    if args.json:
        print_json({"runs": rows})
        return ExitCode.OK
    if not rows:
        where = " ".join(x for x in (args.ep, args.shop) if x)
        print(f"no captured runs{' of ' + where if where else ''}")
        return ExitCode.OK
    from scriptpool.cli._table import LiveTable

    table = LiveTable(
        [
            ("run", 16),
            ("captured (UTC)", 19),
            ("ep", 14),
            ("shop", 12),
            ("app", 10),
            ("version", 7),
            ("outcome", 26),
            ("instructions", 12),
        ]
    )
    for row in rows:
        outcome = row["error_code"] or row["status"]
        table.row(
            row["id"],
            row["captured"],
            row["ep"],
            row["shop"],
            row["app"],
            row["version"],
            outcome,
            row["instructions"],
        )
    return ExitCode.OK


def cmd_runs_show(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.runtime import PART_SINGLE, describe, recorded_output

    run = _find(settings, args.run_id)
    if args.json:
        print_json(describe(run))
        return ExitCode.OK
    report = run.report
    limits = run.limits
    print(f"run {run.id}, captured {_when(run.captured_at)} UTC by {run.worker} (job {run.job_id})")
    where = f"{run.ep}/{run.shop_id} app {run.app} version {run.version}"
    part = "" if run.part == PART_SINGLE else f", a {run.part} part"
    print(f"script:       {where}{part}: sha256 {run.sha256}, export {run.export}, codec {run.codec}")
    if run.ok:
        print(f"outcome:      ok, output {_cut(dumps(recorded_output(run)))}")
    elif run.error is not None:
        print(f"outcome:      error {run.error.code}: {run.error.message}")
    print(
        f"instructions: {report.instructions:,} of {limits['fuel']:,}"
        + (f" (limits scaled x{run.scale_factor:g})" if run.scale_factor != 1.0 else "")
    )
    print(f"memory:       {report.peak_memory_bytes:,} B peak of {limits['memory_bytes']:,} per memory")
    text = _cut(run.input.decode(errors="replace"))
    print(f"input:        {len(run.input):,} B of {limits['input_bytes']:,}: {text}")
    if not run.ok and run.stdout:
        print(f"stdout:       {_cut(run.stdout.decode(errors='replace'))}")
    if report.logs:
        print("logs:         " + _cut(report.logs).rstrip().replace("\n", "\n              "))
    shown = ", ".join(f"{k} {v:,}" for k, v in limits.items())
    print(f"limits:       {shown}")
    print(f"replay it:    scriptpool replay {run.id}")
    return ExitCode.OK


def cmd_runs_delete(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.runtime import valid_run_id

    if not args.run_ids and args.shop is None:
        raise InvalidArgument("runs delete needs RUN_ID ... or --shop SHOP")
    for run_id in args.run_ids:
        valid_run_id(run_id)
    deleted = sum(store.forget(args.run_ids, shop_id=args.shop) for store in _stores(settings, args.shop))
    if args.json:
        print_json({"deleted": deleted})
    else:
        print(f"deleted {deleted} captured run(s)")
    return ExitCode.OK


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.cli._registries import open_registries
    from scriptpool.engine import Sandbox, engine_fingerprint
    from scriptpool.runtime import replay

    run = _find(settings, args.run_id)
    module = read_module(args.module, Limits(**run.limits).module_bytes) if args.module else None
    sandbox = Sandbox(settings.epoch_tick_ms)
    registry = open_registries(settings, sandbox).reader_for_shop(run.shop_id)  # where its module is
    replayed = replay(run, registry, sandbox, module=module)
    result = replayed.result
    engine_differs = run.engine != engine_fingerprint()
    if args.json:
        print_json(_replay_json(replayed, engine_differs))
        return exit_code_for(result.error_code)
    what = (
        "the recorded module" if module is None else f"{args.module} (sha256 {result.deployment.sha256[:12]})"
    )
    print(
        f"replayed run {run.id} ({run.ep}/{run.shop_id} app {run.app} v{run.version}) on {what}, in process"
    )
    if result.ok:
        print(f"outcome:      ok, output {_cut(dumps(result.output))}")
        if result.writes:  # a replay is a pure run again: it shows the writes, applies none
            shown = [write.shown() for write in result.writes]
            print(f"writes:       {len(shown)}, not applied: {_cut(dumps(shown))}")
    elif result.error is not None:
        print(f"outcome:      error {result.error.code}: {result.error.message}")
    recorded = run.error_code or "ok"
    print(_same("output", replayed.same_output, _shown(run.stdout), _shown(result.stdout)))
    print(_same("error code", replayed.same_error_code, recorded, result.error_code or "ok"))
    print(
        _same(
            "instructions",
            replayed.same_instructions,
            f"{run.report.instructions:,}",
            f"{result.report.instructions:,}",
        )
    )
    if result.report.logs:
        print("logs:         " + _cut(result.report.logs).rstrip().replace("\n", "\n              "))
    if engine_differs:
        print("note:         recorded on another engine (wasmtime version or settings): counts may differ")
    return exit_code_for(result.error_code)


def _same(what: str, same: bool, recorded: str, now: str) -> str:
    label = f"{what}:".ljust(14)
    return f"{label}identical ({now})" if same else f"{label}differs: recorded {recorded}, now {now}"


def _replay_json(replayed: Replayed, engine_differs: bool) -> dict[str, Any]:
    from scriptpool.runtime import recorded_output

    run, result = replayed.run, replayed.result
    return {
        "run": run.id,
        "module": replayed.module,
        "sha256": result.deployment.sha256,
        "outcome": {
            "status": "ok" if result.ok else "error",
            "output": result.output,
            "error": None
            if result.error is None
            else {"code": result.error.code, "message": result.error.message, "detail": result.error.detail},
            "stdout": result.stdout.decode("utf-8", errors="replace"),
            "report": result.report.to_wire(),
            "store_writes": [write.shown() for write in result.writes],  # never applied
        },
        "recorded": {
            "status": run.status,
            "output": recorded_output(run),
            "error_code": run.error_code,
            "instructions": run.report.instructions,
            "stdout": run.stdout.decode("utf-8", errors="replace"),
        },
        "identical": {
            "output": replayed.same_output,
            "error_code": replayed.same_error_code,
            "instructions": replayed.same_instructions,
            "all": replayed.identical,
        },
        "engine_differs": engine_differs,
    }


def _shown(stdout: bytes) -> str:
    """Raw output on one line: none, or its text, cut."""
    if not stdout:
        return "none"
    return _cut(stdout.decode("utf-8", errors="replace").strip().replace("\n", "\\n"), 80)


def _cut(text: str, limit: int = SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text):,} chars; --json shows all)"


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))
