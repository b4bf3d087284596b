# PYTHON_ARGCOMPLETE_OK (argcomplete, when installed, completes only entry points that say this)
"""The ``scriptpool`` command line.

A mistake prints one line, ``scriptpool: <code>: <message>`` (with ``--json`` anywhere on the
line, one JSON object on stdout instead), and the exit code says what kind of failure it was
(``ExitCode``, listed in the README).

Each command imports only what it uses: the parser is built from the one module that defines the
command named (``COMMANDS``), so ``--version`` loads neither config nor redis-py, ``run`` and
``status`` never load wasmtime or Celery, and only ``--help`` (or a command mistyped) builds all
of them. Nothing but ``sys`` is imported before :func:`main` is entered, so a Ctrl-C at any
moment of the start-up is the one ``interrupted`` line, exit 130, and never a traceback.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing's: importing typing here would be paid before main() is entered
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

    from scriptpool.cli._output import Parser
    from scriptpool.config import Settings

    Command = Callable[[argparse.Namespace, Settings], int]

# The module (under scriptpool.) that defines each command. A command missing here still works,
# through the full parser; tests/test_cli_startup.py keeps the table complete.
COMMANDS = {
    "deploy": "_registry_commands",
    "undeploy": "_registry_commands",
    "rollback": "_registry_commands",
    "history": "_registry_commands",
    "providers": "_registry_commands",
    "ep": "_registry_commands",
    "run": "_pool_commands",
    "status": "_pool_commands",
    "worker": "_pool_commands",
    "rollout": "_rollout_commands",
    "shard": "_shard_commands",
    "data": "_data_commands",
    "quota": "_quota_commands",
    "runs": "_runs_commands",
    "replay": "_runs_commands",
    "usage": "_usage_commands",
    "demo": "_tool_commands",
    "bench": "_tool_commands",
    "key": "_tool_commands",
}
# The order of the commands in --help.
_MODULES = tuple(dict.fromkeys(COMMANDS.values()))
_HELP = ("-h", "--help")


def build_parser(commands: Sequence[str] | None = None) -> Parser:
    """The parser of every command, or only of the modules that define ``commands``."""
    import importlib

    from scriptpool.cli._output import Parser, VersionAction

    parser = Parser(
        prog="scriptpool",
        description="Deploy and run untrusted WebAssembly checkout scripts on a sharded worker pool.",
        epilog="exit codes: 0 ok, 1 a named error (script failed, module refused), 2 usage mistake, "
        "3 fallback (the pool did not answer; status: a shard has no live worker), "
        "4 Redis unreachable (or it refused the URL's password), 130 interrupted",
    )
    parser.add_argument("--version", action=VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = _MODULES if commands is None else {COMMANDS[c] for c in commands if c in COMMANDS}
    for name in _MODULES:
        if name in wanted:
            importlib.import_module(f"scriptpool.cli.{name}").add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (never raises for a user's mistake). As the
    entry point (no ``argv``), it ends the process itself: see :func:`_exit`."""
    code = _run(argv)
    if argv is None:
        _exit(code)
    return code


def _exit(code: int) -> None:
    """End the process as ``sys.exit`` would, less the interpreter's teardown of every module
    (about 60 ms here after ``run``, a fifth of the command): the atexit functions run (logging
    flushes its handlers, thread pools join, finalizers run), the standard streams are flushed,
    and then the process exits. A thread still running is waited for as usual instead."""
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return
    import atexit
    import os

    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = 141  # the reader left before our last bytes: as a shell reports SIGPIPE
    except OSError:
        pass  # no stream to flush into: the exit code says what happened
    os._exit(code)


def _run(argv: Sequence[str] | None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except BrokenPipeError:
        # Whoever reads our output stopped (``| head -1``); Python would complain at exit again.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # ExitCode.BROKEN_PIPE, without importing anything here
    except KeyboardInterrupt:
        import contextlib

        with contextlib.suppress(KeyboardInterrupt, OSError):  # a second Ctrl-C, or no stderr
            print("scriptpool: interrupted", file=sys.stderr)
        return 130  # ExitCode.INTERRUPTED


def _main(argv: list[str]) -> int:
    import os

    from scriptpool.cli._output import ExitCode, TerminalSafe, classify, report, terminal_safe

    # Usage errors too are one JSON object when --json is anywhere on the line, even where
    # argparse stopped before reaching it.
    json_output = "--json" in argv
    completing = "_ARGCOMPLETE" in os.environ
    try:
        parser = build_parser(None if completing else _commands_named(argv))
        if completing:
            _complete(parser)  # argcomplete answers the shell and exits
            return ExitCode.FAILED  # asked to complete without argcomplete: nothing to answer
        # `scriptpool`, `scriptpool ep`: asked for nothing yet, so the help of what was named.
        bare = _needs_subcommand(parser, argv)
        if bare is not None:
            bare.print_help()
            return ExitCode.OK
        args, extras = parser.parse_known_args(argv)
        if extras:
            parser.unrecognized(argv, extras)
    except Exception as exc:
        error, exit_code = classify(exc)
        if error is None:
            raise
        return report(error, exit_code, json_output=json_output)

    from typing import TextIO, cast

    from scriptpool.config import Settings
    from scriptpool.config.environment import unknown_variables

    _log_warnings()
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


def _commands_named(argv: Sequence[str]) -> list[str] | None:
    """The command ``argv`` names, as a list for :func:`build_parser` ([] for options alone,
    such as ``--version``), or None when only the full parser will do: the help that lists every
    command (asked for, or ``scriptpool`` alone), or a word no command has (so that the error can
    say which command it resembles)."""
    for token in argv:
        if token in _HELP:
            return None
        if not token.startswith("-"):
            return [token] if token in COMMANDS else None
    return [] if argv else None


def _needs_subcommand(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser | None:
    """The (sub)parser ``argv`` names by words alone, if it takes a subcommand that ``argv``
    does not give (``scriptpool``, ``scriptpool ep``); else None."""
    from scriptpool.cli._output import subcommands

    for token in argv:
        choices = subcommands(parser)
        if choices is None or token not in choices:
            return None
        parser = choices[token]
    return parser if subcommands(parser) is not None else None


def _complete(parser: argparse.ArgumentParser) -> None:
    """Shell completion through argcomplete, if it is installed (optional, README: Command
    line): the shell's completion hook runs us with _ARGCOMPLETE set, and argcomplete answers
    from the full parser and exits. Nothing imports it otherwise."""
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def _log_warnings() -> None:
    """Warnings and errors of the libraries go to stderr, rendered as configure_logging does;
    our own summaries go to stdout. The renderer (structlog, about 100 ms to import) is set up
    by the first record that arrives, so a command that logs nothing never imports it."""
    import logging

    class FirstRecord(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            from scriptpool.config import configure_logging

            # Replaces this handler (same name) on the root logger, then takes the record.
            configure_logging(level=logging.WARNING, stream=sys.stderr).handle(record)

    handler = FirstRecord(logging.WARNING)
    handler.set_name("scriptpool")  # the name configure_logging replaces
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "scriptpool"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("scriptpool.client").setLevel(logging.ERROR)  # reconnect chatter
