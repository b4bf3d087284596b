"""Commands on the registry: deploy, rollback, history, extension points and providers."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

import redis

from scriptpool.cli._files import SCHEMA_LIMIT, read_json, read_module
from scriptpool.cli._output import ExitCode, add_ep_shop, add_json_flag, print_json
from scriptpool.config import Limits, Settings, parse_scale_rule, redis_failure
from scriptpool.config.errors import BrokerUnavailable, ConfigurationError, InvalidArgument

if TYPE_CHECKING:
    from scriptpool.engine import Sandbox
    from scriptpool.registry import Definition, Deployment, FieldChange, Registries, Registry

LIMIT_NAMES = ", ".join(Limits().as_dict())
_TRANSPORT = (redis.ConnectionError, redis.TimeoutError, OSError)


def open_registries(settings: Settings, sandbox: Sandbox | None = None) -> Registries:
    """The registry of every shard group, with its own sandbox for validating and compiling.
    Writes go through ``durable``/``on_shop``/``everywhere`` (acknowledged once the replicas
    ``SCRIPTPOOL_DEPLOY_REPLICAS`` asks for have them); reads through ``reader``."""
    from scriptpool.registry import Registries

    return Registries(settings, sandbox)


def open_registry(settings: Settings, sandbox: Sandbox | None = None) -> Registry:
    """A registry for reading extension points and providers (kept in every group): the first
    group whose Redis answers. Modules it compiles run only on ``sandbox``'s engines (its own
    sandbox unless given)."""
    registries = open_registries(settings, sandbox)
    failure: BrokerUnavailable | None = None
    for group in registries.groups:
        registry = registries.reader(group)
        try:
            registry.extension_points()  # one round trip: is this group's Redis there?
        except _TRANSPORT as exc:
            failure = failure or BrokerUnavailable(redis_failure(f"of {group.describe()}", exc))
            continue
        return registry
    assert failure is not None
    raise failure


def add_parsers(sub: Any) -> None:
    deploy = sub.add_parser("deploy", help="validate, compile, sign and bind a module to (EP, shop)")
    add_ep_shop(deploy, "extension point (defined with `ep define`)")
    deploy.add_argument("module", metavar="MODULE", help="a .wasm module, or .wat text")
    deploy.add_argument(
        "--export", default="_start", help="entry export, a () -> () function (default _start)"
    )
    _app_flag(deploy, "the app whose script this is; a join or chain EP runs several apps' scripts")
    deploy.add_argument(
        "--block-on-failure",
        action="store_true",
        help="if this app's script fails, the whole call fails (else only its part is dropped)",
    )
    add_json_flag(deploy)
    deploy.set_defaults(func=cmd_deploy)

    undeploy = sub.add_parser("undeploy", help="remove an app's script (and its history) from (EP, shop)")
    add_ep_shop(undeploy)
    _app_flag(undeploy, "the app whose script to remove")
    add_json_flag(undeploy)
    undeploy.set_defaults(func=cmd_undeploy)

    rollback = sub.add_parser(
        "rollback", help="rebind an earlier version (or, with --to, any version kept, later ones too)"
    )
    add_ep_shop(rollback)
    _app_flag(rollback, "the app to roll back")
    rollback.add_argument(
        "--to",
        type=_version,
        metavar="VERSION",
        help="the version to bind, earlier or later than the live one (see `history`); default: the "
        "newest earlier version that was not itself rolled back",
    )
    add_json_flag(rollback)
    rollback.set_defaults(func=cmd_rollback)

    history = sub.add_parser("history", help="every app's versions at (EP, shop), newest first")
    add_ep_shop(history)
    history.add_argument("--app", help="only this app (default: every app bound there)")
    add_json_flag(history)
    history.set_defaults(func=cmd_history)

    providers = sub.add_parser("providers", help="provider modules that scripts import by name")
    providers_sub = providers.add_subparsers(dest="providers_command", required=True, metavar="ACTION")
    add = providers_sub.add_parser("add", help="install (or replace) a provider")
    add.add_argument("name", help="the import-module name scripts use, e.g. javy_quickjs_provider_v1")
    add.add_argument("module", metavar="MODULE", help="the provider's .wasm (or .wat)")
    add_json_flag(add)
    add.set_defaults(func=cmd_providers_add)
    listing = providers_sub.add_parser("list", help="installed providers")
    add_json_flag(listing)
    listing.set_defaults(func=cmd_providers_list)

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
        help="change --combine even though shops bind apps there (else refused: it changes what "
        "their calls run)",
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


def cmd_deploy(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.registry import start_compile_server

    start_compile_server()  # it loads (about 0.5 s) while this reads the EP and the module
    registries = open_registries(settings)
    what = f"the deploy of {args.module} to {args.ep}/{args.shop}"
    with registries.on_shop(args.shop, what=what, again="deploy the same module again") as registry:
        limits = registry.extension_point(args.ep).limits(settings.limits)  # an unknown EP before any read
        wasm = read_module(args.module, limits.module_bytes)
        deployment = registry.deploy(
            args.ep, args.shop, wasm, export=args.export, app=args.app, block_on_failure=args.block_on_failure
        )
    if args.json:
        print_json(_deployment(deployment, len(wasm), active=True))
    else:
        print(
            f"deployed {args.module} to {_where(deployment)} "
            f"as version {deployment.version} (sha256 {deployment.sha256[:12]})"
        )
    return ExitCode.OK


def cmd_undeploy(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.config.errors import ScriptNotFound

    what = f"the undeploy of app {args.app} from {args.ep}/{args.shop}"
    with open_registries(settings).on_shop(args.shop, what=what, again="undeploy it again") as registry:
        removed = registry.undeploy(args.ep, args.shop, app=args.app)
    if not removed:
        raise ScriptNotFound(f"app {args.app!r} has no script at {args.ep}/{args.shop}", app=args.app)
    if args.json:
        print_json({"ep": args.ep, "shop": str(args.shop), "app": args.app, "undeployed": True})
    else:
        print(f"undeployed app {args.app} from {args.ep}/{args.shop}")
    return ExitCode.OK


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.config.errors import ScriptNotFound

    registries = open_registries(settings)
    app_flag = "" if args.app == "default" else f" --app {args.app}"
    if args.to is not None:  # binding a named version again changes nothing more: safe to repeat
        again = f"run `scriptpool rollback {args.ep} {args.shop}{app_flag} --to {args.to}` again"
    else:
        again = (
            f"see the live version with `scriptpool history {args.ep} {args.shop}`, then bind the one "
            f"you want with `scriptpool rollback {args.ep} {args.shop}{app_flag} --to VERSION` (a second "
            "plain rollback would go one version further back)"
        )
    what = f"the rollback of {args.ep}/{args.shop}"
    with registries.on_shop(args.shop, what=what, again=again) as registry:
        registry.extension_point(args.ep)  # an unknown EP by name, not as nothing deployed
        try:
            replaced = registry.binding(args.ep, str(args.shop), app=args.app).version
        except ScriptNotFound:
            replaced = None
        deployment = registry.rollback(args.ep, args.shop, app=args.app, to=args.to)
        size = registry.module_size(deployment.sha256)
    if args.json:
        print_json({**_deployment(deployment, size, active=True), "replaced_version": replaced})
    elif replaced == deployment.version:
        print(f"version {deployment.version} of {_where(deployment)} is live already")
    else:
        way = "back" if replaced is None or deployment.version < replaced else "forward"
        kept = (
            f" (version {replaced} is kept: `scriptpool rollback {args.ep} {args.shop}{app_flag} "
            f"--to {replaced}` binds it again)"
            if replaced is not None
            else ""
        )
        print(f"rolled {_where(deployment)} {way} to version {deployment.version}{kept}")
    return ExitCode.OK


def _version(text: str) -> int:
    try:
        version = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a version is a whole number, got {text!r}") from None
    if version < 1:
        raise argparse.ArgumentTypeError(f"versions start at 1, got {version}")
    return version


def cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.config.errors import ScriptNotFound

    registry = open_registries(settings).reader_for_shop(args.shop)
    registry.extension_point(args.ep)
    shop = str(args.shop)
    try:
        current = registry.bindings(args.ep, shop).apps
    except ScriptNotFound:
        current = {}
    apps = [args.app] if args.app else sorted(current) or ["default"]
    rows: list[dict[str, Any]] = []
    for app in apps:
        # Every kept version by number, the live one among them: after a rollback the later
        # versions are listed above it, and `rollback --to` binds any of them again.
        kept = [(d, False) for d in registry.history(args.ep, shop, app=app)]
        if app in current:
            kept.append((current[app], True))
        for deployment, active in sorted(kept, key=lambda pair: -pair[0].version):
            rows.append(_deployment(deployment, registry.module_size(deployment.sha256), active=active))
    if args.json:
        live = {app: deployment.version for app, deployment in sorted(current.items())}
        print_json({"ep": args.ep, "shop": shop, "apps": sorted(current), "live": live, "versions": rows})
        return ExitCode.OK
    if not rows:
        print(f"nothing is deployed to {args.ep}/{shop}")
        return ExitCode.OK
    from scriptpool.cli._table import LiveTable

    table = LiveTable(
        [("app", 16), ("version", 7), ("sha256", 12), ("bytes", 9), ("deployed (UTC)", 19), ("active", 13)]
    )
    for row in rows:
        serving = ("yes, blocking" if row["block_on_failure"] else "yes") if row["active"] else ""
        marked = "rolled back" if row["rolled_back"] else serving
        table.row(row["app"], row["version"], row["sha256"][:12], row["bytes"], row["deployed"], marked)
    return ExitCode.OK


def _app_flag(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--app", default="default", help=f"{text} (default: default)")


def _where(deployment: Deployment) -> str:
    where = f"{deployment.ep}/{deployment.shop_id}"
    return where if deployment.app == "default" else f"{where} app {deployment.app}"


def cmd_providers_add(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.registry import start_compile_server

    start_compile_server()  # it loads while this reads the module
    wasm = read_module(args.module, settings.provider_max_bytes, what="provider")
    # Every group: any shop may import it. The same bytes land in each group's Redis.
    provider = open_registries(settings).everywhere(
        lambda registry: registry.add_provider(args.name, wasm),
        what=f"provider {args.name}",
        again=f"run `scriptpool providers add {args.name}` again",
    )[0]
    if args.json:
        print_json({"name": provider.name, "sha256": provider.sha256, "bytes": len(wasm)})
    else:
        print(f"installed provider {provider.name} (sha256 {provider.sha256[:12]}, {len(wasm):,} bytes)")
    return ExitCode.OK


def cmd_providers_list(args: argparse.Namespace, settings: Settings) -> int:
    registry = open_registry(settings)
    rows: list[dict[str, Any]] = []
    for name in registry.providers():
        provider = registry.provider(name)
        rows.append(
            {
                "name": name,
                "sha256": provider.sha256,
                "bytes": registry.module_size(provider.sha256),
                "installed": _when(provider.installed_at),
            }
        )
    if args.json:
        print_json({"providers": rows})
    elif not rows:
        print("no providers installed")
    else:
        from scriptpool.cli._table import LiveTable

        table = LiveTable([("name", 36), ("sha256", 12), ("bytes", 10), ("installed (UTC)", 19)])
        for row in rows:
            table.row(row["name"], row["sha256"][:12], row["bytes"], row["installed"])
    return ExitCode.OK


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
            force=args.force,
            dry_run=dry_run,
        )

    # Every group is checked before any is written, so a refusal in one group (apps bound there
    # under another combine) leaves every group as it was, not some redefined and some not.
    from scriptpool.config import redis_client
    from scriptpool.registry import Registry

    checked: list[tuple[str, Definition]] = []
    for group in registries.groups:
        client = redis_client(group.url, timeout=5.0, connect_timeout=2.0)
        try:
            reader = Registry(client, settings.for_group(group), registries.sandbox)
            checked.append((group.name, define(reader, dry_run=True)))
        except _TRANSPORT:
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
        if change.field.endswith("_schema"):
            text = "added" if change.before is None else "removed" if change.after is None else "replaced"
        else:
            text = f"{before} -> {after}"
        if change.note:
            text += f" ({change.note})"
        if change.field == "combine" and definition.bound_shops:
            text += f" (forced: {definition.bound_shops} shop(s) bind apps here)"
        lines.append(f"  {change.field}: {text}")
    return lines


def _shown(field: str, value: Any) -> str:
    if value is None:
        return "default" if field == "input_validation_rate" else "none"
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
    scale = ", ".join(f"{path} x {rate}" for path, rate in shown["scale"].items())
    print(f"  scale         {scale or 'none (fixed limits)'}")
    capture = (
        f"failed runs and a share {shown['capture_rate']} of successful ones" if shown["capture"] else "off"
    )
    print(f"  capture       {capture}")
    return ExitCode.OK


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
    }


def _deployment(deployment: Deployment, size: int, *, active: bool) -> dict[str, Any]:
    return {
        "ep": deployment.ep,
        "shop": deployment.shop_id,
        "app": deployment.app,
        "version": deployment.version,
        "sha256": deployment.sha256,
        "bytes": size,
        "export": deployment.export,
        "block_on_failure": deployment.block_on_failure,
        "deployed": _when(deployment.deployed_at),
        "active": active,
        # When a rollback to an earlier version replaced it: a plain rollback skips it.
        "rolled_back": None if deployment.rolled_back_at is None else _when(deployment.rolled_back_at),
    }


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))
