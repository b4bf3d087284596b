"""``scriptpool providers add`` and ``providers list``: provider modules that scripts import by
name, installed in every shard group."""

from __future__ import annotations

import argparse
from typing import Any

from scriptpool.cli._files import read_module
from scriptpool.cli._output import ExitCode, add_json_flag, print_json
from scriptpool.cli._registries import open_registries, open_registry, utc_text
from scriptpool.config import Settings


def add_parsers(sub: Any) -> None:
    """The parser of ``providers`` and its actions."""
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
                "installed": utc_text(provider.installed_at),
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
