"""``scriptpool ep define``, ``ep list`` and ``ep show``: extension points, where scripts plug
in, with their limits, schemas (JSON Schema, and the GraphQL input schema that input queries
select from), combine and capture; defined in every shard group."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from scriptpool.cli._files import SCHEMA_LIMIT, read_json
from scriptpool.cli._output import ExitCode, add_json_flag, print_json
from scriptpool.cli._query_text import located, read_schema
from scriptpool.cli._registries import TRANSPORT, open_registries, open_registry
from scriptpool.config import Limits, Settings
from scriptpool.config.errors import BrokerUnavailable, ConfigurationError, InvalidArgument
from scriptpool.config.extension_points import QUERY_BYTES_RANGE, QUERY_COST_RANGE
from scriptpool.config.input_query import MAX_QUERY_BYTES, MAX_QUERY_COST
from scriptpool.config.scale import parse_scale_rule
from scriptpool.config.store import DEFAULT_SESSION_TTL_S, MAX_SESSION_TTL_S, MIN_SESSION_TTL_S

if TYPE_CHECKING:
    from scriptpool.registry import Definition, FieldChange, Registry

LIMIT_NAMES = ", ".join(Limits().as_dict())


def add_parsers(sub: Any) -> None:
    """The parser of ``ep`` and its actions."""
    ep = sub.add_parser("ep", help="extension points: where scripts plug in, with their limits")
    ep_sub = ep.add_subparsers(dest="ep_command", required=True, metavar="ACTION")
    define = ep_sub.add_parser("define", help="create or replace an extension point, saying what changed")
    define.add_argument("name", help="1-64 characters: a-z first, then a-z, 0-9, '_' or '-'")
    define.add_argument(
        "--limits",
        metavar="JSON",
        help=f'limit overrides, a JSON object such as {{"fuel": 5000000}}; names: {LIMIT_NAMES}; each a '
        "whole number within its range (README, Limits and named errors)",
    )
    define.add_argument(
        "--combine",
        choices=("single", "join", "chain"),
        default="single",
        help="how several apps' scripts combine: single (one script per shop, the default), join "
        "(each gets the input, a reducer combines the outputs) or chain (in app order, each gets the "
        "input and the previous output)",
    )
    define.add_argument(
        "--reducer",
        metavar="REDUCER",
        help="a join's reducer: concat:PATH, first, max:PATH, min:PATH, or wasm (the app named reducer)",
    )
    define.add_argument("--input-schema", metavar="FILE", help="JSON Schema of the input (sampled)")
    define.add_argument("--output-schema", metavar="FILE", help="JSON Schema every output must meet")
    define.add_argument(
        "--input-graphql",
        metavar="SCHEMA.graphql",
        help="the input's GraphQL schema (SDL, root type Input), as Shopify's Function APIs publish "
        "theirs: each deploy's --input-query selects from it, and its script gets only that",
    )
    define.add_argument(
        "--max-query-bytes",
        type=_whole(*QUERY_BYTES_RANGE),
        default=MAX_QUERY_BYTES,
        metavar="N",
        help=f"an input query's size cap, comments excluded, in [{QUERY_BYTES_RANGE[0]:,}, "
        f"{QUERY_BYTES_RANGE[1]:,}] (default {MAX_QUERY_BYTES:,}, Shopify's)",
    )
    define.add_argument(
        "--max-query-cost",
        type=_whole(*QUERY_COST_RANGE),
        default=MAX_QUERY_COST,
        metavar="N",
        help=f"an input query's cost cap, in [{QUERY_COST_RANGE[0]:,}, {QUERY_COST_RANGE[1]:,}] (default "
        f"{MAX_QUERY_COST}, Shopify's; README, Input queries)",
    )
    define.add_argument(
        "--session-ttl",
        dest="session_ttl_s",
        type=_whole(MIN_SESSION_TTL_S, MAX_SESSION_TTL_S),
        metavar="SECONDS",
        help=f"how long a session its scripts write lives after the last write, in [{MIN_SESSION_TTL_S}, "
        f"{MAX_SESSION_TTL_S:,}] (1 minute to 30 days; default {DEFAULT_SESSION_TTL_S:,}; README, Script "
        "data and sessions)",
    )
    define.add_argument(
        "--input-validation-rate",
        type=float,
        metavar="R",
        help="share of inputs checked against the input schema, in [0, 1] "
        "(default SCRIPTPOOL_INPUT_VALIDATION_RATE)",
    )
    define.add_argument(
        "--scale",
        action="append",
        metavar="PATH=RATE",
        help="raise the instruction, input and output limits with the input, as Shopify's "
        "@scaleLimits: PATH names a list in the input (keys joined by dots), each item counts RATE; "
        "the largest sum over the rules, clamped to [1, 10], multiplies the limits "
        "(e.g. cart.lines=0.005: 400 lines double them); repeat for several",
    )
    define.add_argument(
        "--capture-rate",
        type=float,
        metavar="R",
        default=0.0,
        help="share of successful runs that workers capture for `runs` and `replay`, in [0, 1] "
        "(failed runs are always captured; default 0)",
    )
    define.add_argument(
        "--no-capture",
        action="store_true",
        help="never capture this EP's runs, failed ones included (its inputs must not be stored)",
    )
    define.add_argument(
        "--force",
        action="store_true",
        help="change --combine even though shops bind apps there, or the input schema or query caps "
        "though input queries bound there would no longer pass (else refused: it changes what their "
        "calls run)",
    )
    define.add_argument(
        "--dry-run", action="store_true", help="say what the definition would change, and write nothing"
    )
    add_json_flag(define)
    define.set_defaults(func=cmd_ep_define)
    ep_list = ep_sub.add_parser("list", help="defined extension points")
    add_json_flag(ep_list)
    ep_list.set_defaults(func=cmd_ep_list)
    show = ep_sub.add_parser("show", help="one extension point: overrides, effective limits, schemas")
    show.add_argument("name", help="extension point")
    add_json_flag(show)
    show.set_defaults(func=cmd_ep_show)


def cmd_ep_define(args: argparse.Namespace, settings: Settings) -> int:
    limits = _parse_limits(args.limits)
    input_schema = (
        read_json(args.input_schema, SCHEMA_LIMIT, InvalidArgument, "schema") if args.input_schema else None
    )
    output_schema = (
        read_json(args.output_schema, SCHEMA_LIMIT, InvalidArgument, "schema") if args.output_schema else None
    )
    scale: dict[str, float] = {}
    for rule in args.scale or ():
        path, rate = parse_scale_rule(rule)
        if path in scale:
            raise InvalidArgument(f"--scale names {path} twice")
        scale[path] = rate
    if args.no_capture and args.capture_rate:
        raise InvalidArgument("--capture-rate and --no-capture contradict each other: give one")
    input_graphql = read_schema(args.input_graphql) if args.input_graphql else None
    if input_graphql is not None:
        from scriptpool.registry import build_input_schema

        try:
            build_input_schema(input_graphql)  # once here, for a refusal that names the file
        except InvalidArgument as exc:
            raise located(args.input_graphql, exc) from None
    registries = open_registries(settings)

    def define(registry: Registry, *, dry_run: bool = False) -> Definition:
        return registry.define(
            args.name,
            limits=limits,
            input_schema=input_schema,
            output_schema=output_schema,
            input_validation_rate=args.input_validation_rate,
            combine=args.combine,
            reducer=args.reducer,
            scale=scale,
            capture_rate=args.capture_rate,
            capture=not args.no_capture,
            input_graphql=input_graphql,
            max_query_bytes=args.max_query_bytes,
            max_query_cost=args.max_query_cost,
            session_ttl_s=args.session_ttl_s,
            force=args.force,
            dry_run=dry_run,
        )

    # Every group is checked before any is written, so a refusal in one group (apps bound there
    # under another combine) leaves every group as it was, not some redefined and some not.
    from scriptpool.config.redis import redis_client
    from scriptpool.registry import Registry

    checked: list[tuple[str, Definition]] = []
    for group in registries.groups:
        client = redis_client(group.url, timeout=5.0, connect_timeout=2.0)
        try:
            reader = Registry(client, settings.for_group(group), registries.sandbox)
            checked.append((group.name, define(reader, dry_run=True)))
        except TRANSPORT:
            continue  # the write below names the group it cannot reach
        finally:
            client.close()
            client.connection_pool.disconnect()
    if args.dry_run:
        if not checked:
            raise BrokerUnavailable("cannot reach the Redis of any shard group")
        done = checked
    else:
        # Every group holds every EP: a worker reads its EPs from its own group's Redis.
        written = registries.everywhere(
            define, what=f"extension point {args.name}", again=f"run `scriptpool ep define {args.name}` again"
        )
        done = [(group.name, d) for group, d in zip(registries.groups, written, strict=True)]
    first = done[0][1]
    differing = [(name, d) for name, d in done[1:] if d.changes != first.changes]
    if args.json:
        shown = {
            **_extension_point(first.ep, settings),
            "created": first.created,
            "written": first.written,
            "changes": [_change(change) for change in first.changes],
            "bound_shops": first.bound_shops,
            "broken_queries": list(first.broken_queries),
        }
        if differing:
            shown["changes_by_group"] = {name: [_change(c) for c in d.changes] for name, d in done}
        print_json(shown)
        return ExitCode.OK
    verb = "would be" if args.dry_run else "is"
    if first.created:
        print(f"extension point {args.name} {verb} defined ({_combine_text(first.ep)})")
    elif not first.changes and not differing:
        print(f"extension point {args.name} {verb} unchanged ({_combine_text(first.ep)})")
    else:
        print(f"extension point {args.name} {verb} redefined ({_combine_text(first.ep)}); changed:")
        print("\n".join(_change_lines(first)) or "  nothing")
        for name, d in differing:  # groups whose record differed before (a write that missed one)
            print(f"  in group {name}:")
            print("\n".join(f"  {line}" for line in _change_lines(d)) or "    nothing")
    return ExitCode.OK


def _combine_text(ep: Any) -> str:
    return f"{ep.combine}" + (f", reducer {ep.reducer}" if ep.reducer else "")


def _change(change: FieldChange) -> dict[str, Any]:
    return {"field": change.field, "before": change.before, "after": change.after, "note": change.note}


def _change_lines(definition: Definition) -> list[str]:
    """One line per changed field: schemas and scale rules by what happened to them, limits with
    thousands separators, a lowered limit and a forced combine change flagged."""
    lines = []
    for change in definition.changes:
        before, after = _shown(change.field, change.before), _shown(change.field, change.after)
        if change.field.endswith("_schema") or change.field == "input_graphql":
            text = "added" if change.before is None else "removed" if change.after is None else "replaced"
        else:
            text = f"{before} -> {after}"
        if change.note:
            text += f" ({change.note})"
        if change.field == "combine" and definition.bound_shops:
            text += f" (forced: {definition.bound_shops} shop(s) bind apps here)"
        lines.append(f"  {change.field}: {text}")
    if definition.broken_queries:
        lines.append(f"  forced: {len(definition.broken_queries)} bound input query(ies) no longer pass:")
        lines += [f"    {where}" for where in definition.broken_queries]
    return lines


def _shown(field: str, value: Any) -> str:
    if value is None:
        return "default" if field in ("input_validation_rate", "session_ttl_s") else "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value)


def cmd_ep_list(args: argparse.Namespace, settings: Settings) -> int:
    registry = open_registry(settings)
    eps = [_extension_point(registry.extension_point(name), settings) for name in registry.extension_points()]
    if args.json:
        print_json({"extension_points": eps})
    elif not eps:
        print("no extension points defined (scriptpool ep define NAME)")
    else:
        for ep in eps:
            overrides = json.dumps(ep["limit_overrides"]) if ep["limit_overrides"] else "default limits"
            print(f"{ep['name']}  {overrides}")
    return ExitCode.OK


def cmd_ep_show(args: argparse.Namespace, settings: Settings) -> int:
    shown = _extension_point(open_registry(settings).extension_point(args.name), settings)
    if args.json:
        print_json(shown)
        return ExitCode.OK
    combine = shown["combine"] + (f", reducer {shown['reducer']}" if shown["reducer"] else "")
    print(f"extension point {shown['name']} ({combine})")
    for name, value in shown["limits"].items():
        mark = "  (override)" if name in shown["limit_overrides"] else ""
        print(f"  {name:<13} {value:>12,}{mark}")
    rate = shown["input_validation_rate"]
    print(
        f"  input schema  {'yes' if shown['input_schema'] else 'none'} (checked for a share {rate} of inputs)"
    )
    print(f"  output schema {'yes' if shown['output_schema'] else 'none'}")
    graphql = (
        f"yes (queries up to {shown['max_query_bytes']:,} bytes and cost {shown['max_query_cost']:,})"
        if shown["input_graphql"]
        else "none (scripts get the whole input)"
    )
    print(f"  input graphql {graphql}")
    scale = ", ".join(f"{path} x {rate}" for path, rate in shown["scale"].items())
    print(f"  scale         {scale or 'none (fixed limits)'}")
    capture = (
        f"failed runs and a share {shown['capture_rate']} of successful ones" if shown["capture"] else "off"
    )
    print(f"  capture       {capture}")
    default = "" if shown["session_ttl_s_set"] else " (the default)"
    print(f"  sessions      live {shown['session_ttl_s']:,} s after their last write{default}")
    return ExitCode.OK


def _whole(low: int, high: int) -> Any:
    """An argparse type: a whole number in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low:,}, {high:,}], got {value:,}")
        return value

    return parse


def _parse_limits(text: str | None) -> dict[str, int] | None:
    if text is None:
        return None
    try:
        limits = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f'--limits is not JSON: {exc}; e.g. {{"fuel": 5000000}}') from None
    if not isinstance(limits, dict):
        raise InvalidArgument(f"--limits must be a JSON object of limit names to integers ({LIMIT_NAMES})")
    try:
        Limits().with_overrides(limits)  # every limit's range, before anything is written
    except ConfigurationError as exc:
        raise InvalidArgument(f"--limits: {exc.message}", **exc.detail) from None
    return limits


def _extension_point(ep: Any, settings: Settings) -> dict[str, Any]:
    rate = ep.input_validation_rate
    return {
        "name": ep.name,
        "limit_overrides": ep.limit_overrides,
        "limits": ep.limits(settings.limits).as_dict(),
        "input_schema": ep.input_schema,
        "output_schema": ep.output_schema,
        "input_validation_rate": settings.input_validation_rate if rate is None else rate,
        "combine": ep.combine,
        "reducer": ep.reducer,
        "scale": ep.scale,
        "capture": ep.capture,
        "capture_rate": ep.capture_rate,
        "input_graphql": ep.input_graphql,
        "max_query_bytes": ep.max_query_bytes,
        "max_query_cost": ep.max_query_cost,
        "session_ttl_s": DEFAULT_SESSION_TTL_S if ep.session_ttl_s is None else ep.session_ttl_s,
        "session_ttl_s_set": ep.session_ttl_s is not None,
    }
