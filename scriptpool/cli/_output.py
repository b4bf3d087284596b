"""What every command shares: exit codes, the one-line error, JSON output.

Imported before a command is chosen, so it imports at the top only what ``scriptpool
--version`` needs: neither config nor redis-py, and not even json, difflib or typing.
"""

from __future__ import annotations

import argparse
import os
import sys
from enum import IntEnum

TYPE_CHECKING = False  # as in scriptpool/__init__.py: typing is not imported to be asked this
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, NoReturn, TextIO

    from scriptpool.config.errors import ScriptpoolError


class ExitCode(IntEnum):
    """What ``scriptpool`` exits with."""

    OK = 0
    FAILED = 1  # a named error: the script failed, the module was refused, nothing to roll back...
    USAGE = 2  # a usage mistake: a bad flag or value, a missing file, malformed JSON or settings
    FALLBACK = 3  # the pool did not answer (timeout, open breaker, worker error); status: a shard unserved
    UNREACHABLE = 4  # Redis could not be reached
    INTERRUPTED = 130
    BROKEN_PIPE = 141  # stdout closed early (``| head``), as a shell reports SIGPIPE


class Parser(argparse.ArgumentParser):
    """argparse with our one-line errors: a usage mistake is an :class:`InvalidArgument`; a
    mistyped command, action or choice is answered with the closest one."""

    def error(self, message: str) -> NoReturn:
        from scriptpool.config.errors import InvalidArgument

        raise InvalidArgument(f"{self.prog}: {message} (see {self.prog} --help)")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is not None and value not in choices:
            import difflib

            close = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1)
            if close:
                listed = ", ".join(map(str, choices))
                raise argparse.ArgumentError(
                    action, f"invalid choice: {value!r}: did you mean {close[0]!r}? (choose from {listed})"
                )
        super()._check_value(action, value)

    def unrecognized(self, argv: Sequence[str], extras: Sequence[str]) -> NoReturn:
        """The error for ``extras``, arguments no parser took, with the option each most
        resembles among those of the (sub)command ``argv`` names."""
        import difflib

        command = self.command_parser(argv)
        known = [option for action in command._actions for option in action.option_strings]
        hints = []
        for extra in extras:
            option = extra.partition("=")[0]
            close = difflib.get_close_matches(option, known, n=1) if option.startswith("-") else []
            if close:
                hints.append(f"{extra}: did you mean {close[0]}?")
        hint = f" ({'; '.join(hints)})" if hints else ""
        command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")

    def command_parser(self, argv: Sequence[str]) -> argparse.ArgumentParser:
        """The parser of the deepest (sub)command ``argv`` names (``ep define`` for
        ``ep define x --limits ...``): this one if it names none."""
        parser: argparse.ArgumentParser = self
        for token in argv:
            choices = subcommands(parser)
            if choices is not None and token in choices:
                parser = choices[token]
        return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    """The sub-parsers of ``parser`` by name, or None if it takes no subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return None


class VersionAction(argparse.Action):
    """``--version``: the installed version, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"scriptpool {installed_version()}")
        parser.exit()


def installed_version() -> str:
    """The installed distribution's version, found as ``importlib.metadata.version`` finds it:
    the first ``scriptpool`` dist-info (or egg-info) along ``sys.path``. Read here, because
    importing importlib.metadata (email, zipfile and more behind it) was a third of what
    ``--version`` cost; it remains the fallback."""
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            stem, _, kind = name.rpartition(".")
            if kind not in ("dist-info", "egg-info") or stem.split("-")[0].lower() != "scriptpool":
                continue
            path = os.path.join(entry, name, "METADATA" if kind == "dist-info" else "PKG-INFO")
            try:
                with open(path, encoding="utf-8") as metadata:
                    for line in metadata:
                        if line.startswith("Version:"):
                            return line.partition(":")[2].strip()
                        if not line.strip():
                            break  # the headers end at the first blank line
            except OSError:
                continue
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scriptpool")
    except PackageNotFoundError:
        return "unknown (not installed)"


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """The one spelling of machine-readable output, for every command that prints something."""
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def add_ep_shop(parser: argparse.ArgumentParser, ep_help: str = "extension point") -> None:
    """The ``EP SHOP`` positionals a command about one (extension point, shop) takes."""
    parser.add_argument("ep", help=ep_help)
    parser.add_argument("shop", help="shop id")


def print_json(value: Any) -> None:
    print(dumps(value, indent=2, default=str))


def dumps(value: Any, **options: Any) -> str:
    """``json.dumps`` for data that came from a script or from Redis: nested deeper than the
    encoder recurses, it is one :class:`InvalidOutput` line, not a traceback."""
    import json

    try:
        return json.dumps(value, **options)
    except RecursionError:
        from scriptpool.config.errors import InvalidOutput

        raise InvalidOutput("the result is nested too deeply to print as JSON") from None


def classify(exc: BaseException) -> tuple[ScriptpoolError | None, ExitCode]:
    """The named error a failure means to a user, and the exit code it gets (None: a bug)."""
    from scriptpool.config.errors import (
        BrokerUnavailable,
        ConfigurationError,
        InvalidArgument,
        PoolError,
        ScriptpoolError,
    )
    from scriptpool.config.redis import redis_failure

    redis = sys.modules.get("redis")  # not imported: the failure is none of its errors
    if redis is not None and isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return BrokerUnavailable(redis_failure(f"at {redis_address()}", exc)), ExitCode.UNREACHABLE
    if redis is not None and isinstance(exc, redis.ResponseError):
        if "DB index" in str(exc):
            message = f"SCRIPTPOOL_REDIS_URL names a database Redis does not have: {exc}"
            return ConfigurationError(message), ExitCode.USAGE
        return BrokerUnavailable(f"Redis at {redis_address()} refused a command: {exc}"), ExitCode.FAILED
    if isinstance(exc, (InvalidArgument, ConfigurationError)):
        return exc, ExitCode.USAGE
    if isinstance(exc, BrokerUnavailable):
        return exc, ExitCode.UNREACHABLE
    if isinstance(exc, PoolError):
        return exc, ExitCode.FALLBACK
    if isinstance(exc, ScriptpoolError):
        return exc, ExitCode.FAILED
    return None, ExitCode.FAILED


def exit_code_for(error_code: str | None) -> ExitCode:
    """The exit code of a command whose outcome carries ``error_code`` (None: success)."""
    if error_code is None:
        return ExitCode.OK
    from scriptpool.config.errors import error_class_for

    return classify(error_class_for(error_code)(""))[1]


# Control characters (but newline and tab), C1 controls and the bidirectional overrides: a
# script's logs, or a name in its module, could otherwise move the cursor, retitle the terminal
# or reorder what an operator reads.
_UNSAFE = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in (*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A))
    if chr(code) not in "\n\t"
}


def terminal_safe(text: str) -> str:
    """``text`` with what a terminal would act on shown as escapes (``\\x1b``)."""
    return text.translate(_UNSAFE)


class TerminalSafe:
    """A text stream whose writes go through :func:`terminal_safe`: the command line's standard
    output, so no view of what a script wrote (logs, output bytes, a captured input) can act on
    the operator's terminal, whichever command prints it. JSON output is ASCII with every control
    escaped already, so it passes unchanged."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(text.translate(_UNSAFE))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def report(error: ScriptpoolError, exit_code: ExitCode, *, json_output: bool) -> int:
    """Print ``error`` as one line on stderr (or one JSON object on stdout) and return the code."""
    message = " ".join(error.message.split())
    if json_output:
        print_json({"error": {"code": error.code, "message": message, "exit_code": int(exit_code)}})
    else:  # stderr is not wrapped (library warnings are JSON lines): this line is made safe here
        print(f"scriptpool: {error.code}: {terminal_safe(message)}", file=sys.stderr)
    return exit_code


def redis_address() -> str:
    """Where SCRIPTPOOL_REDIS_URL points, without its passwords (or where every group's Redis
    is, with SCRIPTPOOL_SHARD_GROUPS)."""
    from scriptpool.config import Settings
    from scriptpool.config.errors import ConfigurationError
    from scriptpool.config.groups import parse_shard_groups
    from scriptpool.config.redis import describe_redis_url

    url = os.environ.get("SCRIPTPOOL_REDIS_URL", Settings().redis_url)
    groups_text = os.environ.get("SCRIPTPOOL_SHARD_GROUPS", "")
    if groups_text.strip():
        try:
            shards = int(os.environ.get("SCRIPTPOOL_SHARDS", Settings().shards))
            groups = parse_shard_groups(groups_text, shards, url)
        except (ValueError, ConfigurationError):
            return "the Redis of SCRIPTPOOL_SHARD_GROUPS"
        return ", ".join(f"{g.name}: {describe_redis_url(g.url)}" for g in groups)
    return describe_redis_url(url)
