"""``scriptpool rollout``: start a verified rollout, watch it, promote or abort it by hand."""

from __future__ import annotations

import argparse
import time
from typing import Any

from scriptpool.cli._files import read_module
from scriptpool.cli._output import ExitCode, add_ep_shop, add_json_flag, dumps, print_json
from scriptpool.cli._query_text import located, query_summary, read_query, summary_text
from scriptpool.cli._registries import open_registries
from scriptpool.config import Settings

# The flags of a rollout's rules (scriptpool.registry.RolloutRules, field by field), with its defaults.
_RULES: tuple[tuple[str, type, float, str, str], ...] = (
    ("--shadow-rate", float, 1.0, "R", "share of live calls also run on the candidate"),
    ("--promote-after", int, 100, "N", "compared runs before promotion"),
    (
        "--max-mismatch-rate",
        float,
        0.0,
        "M",
        "the mismatch rate at which it still promotes; over it, it aborts (0: any mismatch aborts)",
    ),
    (
        "--canary-percent",
        float,
        0.0,
        "P",
        "after shadowing passes, serve P%% of calls (by a hash of their input) from the candidate "
        "before promoting (0: promote at once)",
    ),
    ("--canary-calls", int, 100, "K", "canary calls before promotion"),
    (
        "--max-error-increase",
        float,
        0.01,
        "E",
        "abort the canary if its error rate exceeds the live one's by more than E",
    ),
)


def add_parsers(sub: Any) -> None:
    rollout = sub.add_parser(
        "rollout", help="deploy a candidate beside the live version, verified on shadow runs before it serves"
    )
    rollout_sub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")

    start = rollout_sub.add_parser("start", help="validate, compile and sign a candidate and start shadowing")
    add_ep_shop(start)
    start.add_argument("module", metavar="MODULE", help="the candidate's .wasm (or .wat)")
    start.add_argument("--export", default="_start", help="entry export (default _start)")
    start.add_argument(
        "--app", default="default", help="the app whose live script it would replace (default: default)"
    )
    start.add_argument(
        "--input-query",
        metavar="QUERY.graphql",
        help="the candidate's input query, checked as `deploy --input-query` checks it; promotion binds "
        "it with the module (default: the candidate gets the whole input)",
    )
    for flag, kind, default, metavar, text in _RULES:
        start.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{text} (default {default})"
        )
    add_json_flag(start)
    start.set_defaults(func=cmd_start)

    status = rollout_sub.add_parser("status", help="state, counts, reason and mismatch samples")
    add_ep_shop(status)
    add_json_flag(status)
    status.set_defaults(func=cmd_status)

    for action, text in (
        ("promote", "make the candidate the live version now"),
        ("abort", "drop the candidate now"),
    ):
        decide = rollout_sub.add_parser(action, help=text)
        add_ep_shop(decide)
        add_json_flag(decide)
        decide.set_defaults(func=cmd_decide, decision=action)


def cmd_start(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.config.errors import InvalidInputQuery
    from scriptpool.registry import RolloutRules

    fields = [flag[2:].replace("-", "_") for flag, *_ in _RULES]
    rules = RolloutRules(**{field: getattr(args, field) for field in fields})
    what = f"the rollout of {args.module} at {args.ep}/{args.shop}"
    again = f"see `scriptpool rollout status {args.ep} {args.shop}`, and start it again if it is not there"
    with open_registries(settings).on_shop(args.shop, what=what, again=again) as registry:
        definition = registry.extension_point(args.ep)
        wasm = read_module(args.module, definition.limits(settings.limits).module_bytes)
        query = read_query(args.input_query) if args.input_query else None
        try:
            candidate = registry.start_rollout(
                args.ep, args.shop, wasm, rules, export=args.export, app=args.app, input_query=query
            )
        except InvalidInputQuery as exc:
            raise located(args.input_query or "-", exc) from None
    summary = query_summary(candidate.input_query, definition, full=True)
    if args.json:
        print_json(
            {
                "ep": args.ep,
                "shop": str(args.shop),
                "app": candidate.app,
                "rollout": candidate.id,
                "sha256": candidate.deployment["sha256"],
                "state": candidate.state,
                "input_query": summary,
            }
        )
    else:
        where = f"{args.ep}/{args.shop} (app {candidate.app})"
        print(
            f"rollout {candidate.id} of {args.module} at {where}: shadowing {rules.shadow_rate:.0%} of "
            f"calls, promoting after {rules.promote_after} compared runs"
            + (f"; input query {summary_text(summary)}" if summary else "")
        )
    return ExitCode.OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    status = open_registries(settings).reader_for_shop(args.shop).rollouts.status(args.ep, str(args.shop))
    if args.json:
        print_json(
            {
                "ep": status.ep,
                "shop": status.shop,
                "app": status.app,
                "state": status.state,
                "reason": status.reason,
                "sha256": status.sha256,
                "counts": status.counts,
                "samples": status.samples,
            }
        )
        return ExitCode.OK
    counts = {k: int(v) for k, v in status.counts.items()}
    compared = counts.get("compared", 0)
    print(
        f"{status.ep}/{status.shop} app {status.app}: {status.state}"
        + (f" ({status.reason})" if status.reason else "")
    )
    found = [f"{counts.get(k, 0)} {k.replace('_', ' ')}" for k in ("match", "mismatch", "candidate_error")]
    print(f"  compared {compared}: {', '.join(found)}")
    if compared:
        instructions = counts.get("instructions_delta_sum", 0) / compared
        peak = counts.get("peak_memory_delta_sum", 0) / compared
        print(
            f"  per run, candidate minus live: {instructions:+,.0f} instructions, {peak:+,.0f} B peak memory"
        )
    if "canary_calls" in counts:
        canary = f"{counts['canary_calls']} calls, {counts.get('canary_errors', 0)} errors"
        live = f"{counts.get('live_calls', 0)} calls, {counts.get('live_errors', 0)} errors"
        print(f"  canary: {canary}; live meanwhile {live}")
    for sample in status.samples:
        when = time.strftime("%H:%M:%S", time.gmtime(sample["at"]))
        live, cand = sample["live"], sample["candidate"]
        print(f"  {when} {sample['result']}: input {sample['input'][:80]}")
        print(f"      live      {live['status']} {live['error_code'] or ''} {_short(live['output'])}")
        print(f"      candidate {cand['status']} {cand['error_code'] or ''} {_short(cand['output'])}")
        if live["status"] == cand["status"] == "ok":
            path, ours, theirs = first_difference(live["output"], cand["output"])
            where = path or "(top)"
            print(f"      first difference at {where}: live {_short(ours)}, candidate {_short(theirs)}")
    return ExitCode.OK


def cmd_decide(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.registry import ABORTED, PROMOTED

    state = PROMOTED if args.decision == "promote" else ABORTED
    what = f"the {args.decision} of the rollout at {args.ep}/{args.shop}"
    again = f"see `scriptpool rollout status {args.ep} {args.shop}`"
    with open_registries(settings).on_shop(args.shop, what=what, again=again) as registry:
        ended = registry.rollouts.decide(args.ep, str(args.shop), state, f"{args.decision}d by hand")
    if args.json:
        print_json({"ep": args.ep, "shop": str(args.shop), "state": ended})
    else:
        print(f"rollout at {args.ep}/{args.shop} {ended}")
    return ExitCode.OK


_MISSING = object()


def first_difference(live: Any, candidate: Any, path: str = "") -> tuple[str, Any, Any]:
    """Where two JSON values first differ (keys in sorted order), and the two values there;
    a side that lacks the key or index shows as ``(missing)``."""
    if isinstance(live, dict) and isinstance(candidate, dict):
        for key in sorted(set(live) | set(candidate)):
            a, b = live.get(key, _MISSING), candidate.get(key, _MISSING)
            if _differ(a, b):
                return first_difference(a, b, f"{path}.{key}" if path else key)
    elif isinstance(live, list) and isinstance(candidate, list):
        for index in range(max(len(live), len(candidate))):
            a = live[index] if index < len(live) else _MISSING
            b = candidate[index] if index < len(candidate) else _MISSING
            if _differ(a, b):
                return first_difference(a, b, f"{path}[{index}]")
    return path, live, candidate


def _differ(a: Any, b: Any) -> bool:
    return a is _MISSING or b is _MISSING or dumps(a, sort_keys=True) != dumps(b, sort_keys=True)


def _short(value: Any) -> str:
    if value is _MISSING:
        return "(missing)"
    text = dumps(value)
    return text if len(text) <= 100 else text[:97] + "..."
