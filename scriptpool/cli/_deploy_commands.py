"""``scriptpool deploy``, ``undeploy``, ``rollback`` and ``history``: binding a module to (EP,
shop) as an app's script, and moving between the versions kept."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from scriptpool.cli._files import read_module
from scriptpool.cli._output import ExitCode, add_ep_shop, add_json_flag, print_json
from scriptpool.cli._query_text import located, query_summary, read_query, summary_text
from scriptpool.cli._registries import open_registries, utc_text
from scriptpool.config import Settings

if TYPE_CHECKING:
    from scriptpool.config import ExtensionPoint
    from scriptpool.registry import Deployment

INPUT_QUERY_HELP = (
    "the script's input query (GraphQL, e.g. the run.graphql that Shopify's toolchains build beside "
    "the module), checked against the EP's --input-graphql schema and caps: the script gets only "
    "what it selects (default: the whole input; a run.graphql is never picked up unless named here)"
)


def add_parsers(sub: Any) -> None:
    """The parsers of ``deploy``, ``undeploy``, ``rollback`` and ``history``."""
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
    deploy.add_argument("--input-query", metavar="QUERY.graphql", help=INPUT_QUERY_HELP)
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


def cmd_deploy(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.config.errors import InvalidInputQuery
    from scriptpool.registry import start_compile_server

    start_compile_server()  # it loads (about 0.5 s) while this reads the EP and the module
    registries = open_registries(settings)
    what = f"the deploy of {args.module} to {args.ep}/{args.shop}"
    with registries.on_shop(args.shop, what=what, again="deploy the same module again") as registry:
        definition = registry.extension_point(args.ep)  # an unknown EP before any read
        wasm = read_module(args.module, definition.limits(settings.limits).module_bytes)
        query = read_query(args.input_query) if args.input_query else None
        try:
            deployment = registry.deploy(
                args.ep,
                args.shop,
                wasm,
                export=args.export,
                app=args.app,
                block_on_failure=args.block_on_failure,
                input_query=query,
            )
        except InvalidInputQuery as exc:
            raise located(args.input_query or "-", exc) from None
    shown = _deployment(deployment, len(wasm), active=True, definition=definition, full=True)
    if args.json:
        print_json(shown)
    else:
        summary = summary_text(shown["input_query"])
        print(
            f"deployed {args.module} to {_where(deployment)} "
            f"as version {deployment.version} (sha256 {deployment.sha256[:12]})"
            + (f", input query {summary}" if summary else "")
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
        definition = registry.extension_point(args.ep)  # an unknown EP by name, not as nothing deployed
        try:
            replaced = registry.binding(args.ep, str(args.shop), app=args.app).version
        except ScriptNotFound:
            replaced = None
        deployment = registry.rollback(args.ep, args.shop, app=args.app, to=args.to)
        size = registry.module_size(deployment.sha256)
    if args.json:
        shown = _deployment(deployment, size, active=True, definition=definition, full=True)
        print_json({**shown, "replaced_version": replaced})
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
    definition = registry.extension_point(args.ep)
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
            size = registry.module_size(deployment.sha256)
            rows.append(_deployment(deployment, size, active=active, definition=definition, full=args.json))
    if args.json:
        live = {app: deployment.version for app, deployment in sorted(current.items())}
        print_json({"ep": args.ep, "shop": shop, "apps": sorted(current), "live": live, "versions": rows})
        return ExitCode.OK
    if not rows:
        print(f"nothing is deployed to {args.ep}/{shop}")
        return ExitCode.OK
    from scriptpool.cli._table import LiveTable

    table = LiveTable(
        [
            ("app", 16),
            ("version", 7),
            ("sha256", 12),
            ("bytes", 9),
            ("deployed (UTC)", 19),
            ("input query", 28),
            ("active", 13),
        ]
    )
    for row in rows:
        serving = ("yes, blocking" if row["block_on_failure"] else "yes") if row["active"] else ""
        marked = "rolled back" if row["rolled_back"] else serving
        query = summary_text(row["input_query"]) or "whole input"
        table.row(
            row["app"], row["version"], row["sha256"][:12], row["bytes"], row["deployed"], query, marked
        )
    return ExitCode.OK


def _app_flag(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--app", default="default", help=f"{text} (default: default)")


def _where(deployment: Deployment) -> str:
    where = f"{deployment.ep}/{deployment.shop_id}"
    return where if deployment.app == "default" else f"{where} app {deployment.app}"


def _deployment(
    deployment: Deployment,
    size: int,
    *,
    active: bool,
    definition: ExtensionPoint,
    full: bool,
) -> dict[str, Any]:
    """A deployment as ``deploy``, ``rollback`` and ``history`` show it; with the EP's
    ``definition``, its input query's digest, size and cost (``full``: and its text)."""
    query = deployment.input_query
    return {
        "ep": deployment.ep,
        "shop": deployment.shop_id,
        "app": deployment.app,
        "version": deployment.version,
        "sha256": deployment.sha256,
        "bytes": size,
        "export": deployment.export,
        "block_on_failure": deployment.block_on_failure,
        "deployed": utc_text(deployment.deployed_at),
        "active": active,
        # When a rollback to an earlier version replaced it: a plain rollback skips it.
        "rolled_back": None if deployment.rolled_back_at is None else utc_text(deployment.rolled_back_at),
        # None: the script gets the whole input.
        "input_query": query_summary(query, definition, full=full),
    }
