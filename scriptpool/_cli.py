"""The ``scriptpool`` command line.

A mistake prints one line, ``scriptpool: <code>: <message>`` (with ``--json``, one JSON object on
stdout instead), and the exit code says what kind of failure it was (``ExitCode``, listed in the
README). Each command imports only what it uses, so ``run`` and ``status`` never load wasmtime.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO, cast

from config import Settings, configure_logging, unknown_variables
from config.errors import InvalidArgument
from scriptpool._output import ExitCode, Parser, TerminalSafe, classify, report, terminal_safe

Command = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    from scriptpool import (
        _pool_commands,
        _registry_commands,
        _rollout_commands,
        _runs_commands,
        _shard_commands,
        _tool_commands,
    )

    parser = Parser(
        prog="scriptpool",
        description="Deploy and run untrusted WebAssembly checkout scripts on a sharded worker pool.",
        epilog="exit codes: 0 ok, 1 a named error (script failed, module refused), 2 usage mistake, "
        "3 fallback (the pool did not answer; status: a shard has no live worker), "
        "4 Redis unreachable",
    )
    parser.add_argument("--version", action="version", version=f"scriptpool {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _registry_commands.add_parsers(sub)
    _pool_commands.add_parsers(sub)
    _rollout_commands.add_parsers(sub)
    _shard_commands.add_parsers(sub)
    _runs_commands.add_parsers(sub)
    _tool_commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (never raises for a user's mistake)."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Whoever reads our output stopped (``| head -1``); Python would complain at exit again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except InvalidArgument as exc:
        return report(exc, ExitCode.USAGE, json_output=False)
    # Our own summaries go to stdout; only warnings and errors of the library reach stderr.
    configure_logging(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("scriptpool.client").setLevel(logging.ERROR)  # reconnect chatter
    json_output = bool(getattr(args, "json", False))
    for name, close in unknown_variables(os.environ):
        hint = f": did you mean {close}?" if close else " (the README's Configuration lists them)"
        warning = f"scriptpool: warning: {name} is not a setting and is ignored{hint}"
        print(terminal_safe(warning), file=sys.stderr)
    func: Command = args.func
    stdout = sys.stdout
    sys.stdout = cast(TextIO, TerminalSafe(stdout))
    try:
        code = func(args, Settings.from_env())
        sys.stdout.flush()
        return code
    except Exception as exc:
        error, exit_code = classify(exc)
        if error is None:
            raise  # a bug: its traceback is what gets it fixed
        return report(error, exit_code, json_output=json_output)
    finally:
        sys.stdout = stdout


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scriptpool")
    except PackageNotFoundError:
        return "unknown (not installed)"
