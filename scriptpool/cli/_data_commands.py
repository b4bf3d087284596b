"""``scriptpool data set``, ``data get``, ``data list`` and ``data delete``: an app's APP data
(every shop's, in every shard group) and SHOP data (``--shop``), which its scripts read through
their input query (README, "Script data and sessions")."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from scriptpool.cli._files import read_bounded
from scriptpool.cli._output import ExitCode, add_json_flag, print_json, terminal_safe
from scriptpool.config import Settings
from scriptpool.config.errors import DataNotFound, InvalidArgument

if TYPE_CHECKING:
    from scriptpool.producer import DataStore

# A value file may hold whitespace that minifying drops: it is read up to this many times the
# value cap, and the minified text is then held to the cap itself.
_FILE_FACTOR = 4


def add_parsers(sub: Any) -> None:
    """The parser of ``data`` and its actions."""
    data = sub.add_parser(
        "data", help="an app's data for its scripts: every shop's (APP) or one shop's (SHOP)"
    )
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    put = actions.add_parser("set", help="store a JSON value under a key (from a file, or - for stdin)")
    _scope_flags(put)
    put.add_argument("key", help="1-256 printable characters")
    put.add_argument("file", metavar="FILE", help="the value: a JSON document (- reads stdin)")
    add_json_flag(put)
    put.set_defaults(func=cmd_data_set)
    get = actions.add_parser("get", help="print the JSON value stored under a key")
    _scope_flags(get, session=True)
    get.add_argument("key", help="the key")
    add_json_flag(get)
    get.set_defaults(func=cmd_data_get)
    listing = actions.add_parser("list", help="the keys of a scope, with their values' sizes")
    _scope_flags(listing, session=True)
    add_json_flag(listing)
    listing.set_defaults(func=cmd_data_list)
    delete = actions.add_parser("delete", help="delete a key")
    _scope_flags(delete)
    delete.add_argument("key", help="the key")
    add_json_flag(delete)
    delete.set_defaults(func=cmd_data_delete)


def _scope_flags(parser: argparse.ArgumentParser, *, session: bool = False) -> None:
    parser.add_argument("--app", required=True, help="the app whose data it is")
    parser.add_argument("--shop", help="one shop's data (SHOP scope); without it, every shop's (APP scope)")
    if session:
        parser.add_argument(
            "--session",
            metavar="TOKEN",
            help="read a session scripts wrote at --shop instead (for debugging; scripts write sessions)",
        )


def _store(settings: Settings) -> DataStore:
    from scriptpool.producer import DataStore

    return DataStore(settings)


def _where(args: argparse.Namespace) -> dict[str, Any]:
    scope = "SESSION" if getattr(args, "session", None) is not None else "SHOP" if args.shop else "APP"
    return {"app": args.app, "scope": scope, "shop": args.shop}


def _where_text(args: argparse.Namespace) -> str:
    if getattr(args, "session", None) is not None:
        return f"session data of app {args.app} at shop {args.shop}"
    return (
        f"app {args.app}'s data for shop {args.shop}"
        if args.shop
        else f"app {args.app}'s data for every shop"
    )


def _session_of(args: argparse.Namespace, store: DataStore) -> dict[str, Any] | None:
    """The session ``--session`` names (None without the flag)."""
    if args.session is None:
        return None
    if args.shop is None:
        raise InvalidArgument("--session needs --shop: a session belongs to one shop")
    return store.get_session(args.app, args.shop, args.session)


def cmd_data_set(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.config.store import MAX_VALUE_BYTES, check_key

    check_key(args.key, "SHOP" if args.shop else "APP")  # before reading the file
    raw = read_bounded(args.file, MAX_VALUE_BYTES * _FILE_FACTOR, InvalidArgument, "value file")
    source = "stdin" if args.file == "-" else args.file
    if not raw.strip():
        raise InvalidArgument(
            f"{source} is empty: give a JSON document (null deletes nothing: use data delete)"
        )
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"{source} is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument(f"{source} is nested too deeply") from None
    with _store(settings) as store:
        size = store.set(args.app, args.key, value, shop=args.shop)
        groups = 1 if args.shop else len(settings.groups)
    if args.json:
        print_json({**_where(args), "key": args.key, "bytes": size, "groups": groups})
    else:
        where = f"{groups} shard group(s)" if not args.shop else "its shard group"
        print(f"stored {terminal_safe(args.key)} ({size:,} bytes) in {_where_text(args)}, in {where}")
    return ExitCode.OK


def cmd_data_get(args: argparse.Namespace, settings: Settings) -> int:
    stored_as_is = False  # a value put into Redis by hand, not JSON: shown as stored
    with _store(settings) as store:
        session = _session_of(args, store)
        if session is not None:
            if args.key not in session:
                raise _not_found(args)
            value = session[args.key]
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
            size = len(text.encode())
        else:
            raw = store.get_raw(args.app, args.key, shop=args.shop)
            if raw is None:
                raise _not_found(args)
            text, size = raw.decode(errors="replace"), len(raw)
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past the stack
                stored_as_is, value = True, None
    if stored_as_is:
        warning = f"scriptpool: warning: the value of {args.key!r} in {_where_text(args)} is not JSON"
        print(terminal_safe(f"{warning} (not written by scriptpool); shown as stored"), file=sys.stderr)
    if args.json:
        # "value" null and "stored" the text: a JSON string value stays distinguishable.
        shown = {"stored": text} if stored_as_is else {}
        print_json({**_where(args), "key": args.key, "bytes": size, "value": value, **shown})
    else:
        print(terminal_safe(text))
    return ExitCode.OK


def _not_found(args: argparse.Namespace) -> DataNotFound:
    where = _where(args)
    return DataNotFound(f"no key {args.key!r} in {_where_text(args)}", key=args.key, **where)


def cmd_data_list(args: argparse.Namespace, settings: Settings) -> int:
    with _store(settings) as store:
        session = _session_of(args, store)
        if session is not None:
            sizes = {
                key: len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
                for key, value in session.items()
            }
        else:
            sizes = store.list(args.app, shop=args.shop)
    if args.json:
        print_json({**_where(args), "keys": sizes, "total_bytes": sum(sizes.values())})
        return ExitCode.OK
    if not sizes:
        print(f"no keys in {_where_text(args)}")
        return ExitCode.OK
    print(f"{len(sizes):,} key(s) in {_where_text(args)}, {sum(sizes.values()):,} bytes of values:")
    width = min(max(len(key) for key in sizes), 60)
    for key, size in sizes.items():
        print(f"  {terminal_safe(key):<{width}}  {size:>8,} B")
    return ExitCode.OK


def cmd_data_delete(args: argparse.Namespace, settings: Settings) -> int:
    with _store(settings) as store:
        existed = store.delete(args.app, args.key, shop=args.shop)
    if args.json:
        print_json({**_where(args), "key": args.key, "deleted": existed})
    elif existed:
        print(f"deleted {terminal_safe(args.key)} from {_where_text(args)}")
    else:
        print(f"{terminal_safe(args.key)} was not in {_where_text(args)}: nothing to delete")
    return ExitCode.OK
