"""Input queries on the command line: reading a query or an EP's GraphQL input schema from a
file (refusals named by ``FILE:LINE:COLUMN``), and the short form ``history`` and ``status``
show of a bound query."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scriptpool.cli._files import SCHEMA_LIMIT, read_bounded
from scriptpool.config.errors import InvalidArgument, InvalidInputQuery, ScriptpoolError

if TYPE_CHECKING:
    from scriptpool.config import ExtensionPoint

# A query file is read up to 4 times the largest size cap an EP may set (comments count for the
# file, not for the cap); InputQuery.compile then holds the text to the EP's own caps.
QUERY_FILE_LIMIT = 4 * 65_536


def read_query(path: str) -> str:
    """The text of the query file ``path`` (``-`` is stdin); not UTF-8 is ``invalid_input_query``
    at the line and column of the first bad byte."""
    return _text(
        path, read_bounded(path, QUERY_FILE_LIMIT, InvalidInputQuery, "input query"), InvalidInputQuery
    )


def read_schema(path: str) -> str:
    """The SDL text of the schema file ``path``; not UTF-8 is ``invalid_argument``."""
    return _text(path, read_bounded(path, SCHEMA_LIMIT, InvalidArgument, "input schema"), InvalidArgument)


def _text(path: str, data: bytes, error: type[ScriptpoolError]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        problem = f"not UTF-8 text (byte 0x{data[exc.start]:02x})"
        raise error(f"{path}:{line}:{column}: {problem}", problem=problem, line=line, column=column) from None


def located(path: str, exc: ScriptpoolError) -> ScriptpoolError:
    """``exc`` (a refused query, or schema) as one line that starts ``FILE:LINE:COLUMN:``, as
    compilers and editors name a place; the detail is kept."""
    detail = exc.detail
    if "line" not in detail or "problem" not in detail:
        return exc
    what = "input query" if isinstance(exc, InvalidInputQuery) else "input schema"
    return type(exc)(
        f"{path}:{detail['line']}:{detail['column']}: {what} refused: {detail['problem']}",
        **{**detail, "file": path},
    )


def query_summary(text: str | None, definition: ExtensionPoint, *, full: bool) -> dict[str, Any] | None:
    """What ``history`` and ``status`` show of a deployment's input query (None: it has none, the
    script gets the whole input): its SHA-256, its size as the cap counts it and its cost under
    the EP's schema as it is now (``problem`` says why not, if the schema or caps changed since
    under ``--force``); ``full`` adds the text."""
    if text is None:
        return None
    from scriptpool.config.input_query import query_bytes
    from scriptpool.registry import check_query, query_digest

    shown: dict[str, Any] = {"sha256": query_digest(text), "bytes": query_bytes(text), "cost": None}
    try:
        shown["cost"] = check_query(definition, text).cost
    except InvalidInputQuery as exc:
        shown["problem"] = exc.message
    if full:
        shown["text"] = text
    return shown


def summary_text(shown: dict[str, Any] | None) -> str | None:
    """The short form of :func:`query_summary`: ``1a2b3c4d5e6f 504 B cost 8`` (``invalid``
    instead of a cost when the EP's schema or caps no longer pass it); None without a query."""
    if shown is None:
        return None
    cost = f"cost {shown['cost']}" if shown["cost"] is not None else "invalid"
    return f"{shown['sha256'][:12]} {shown['bytes']:,} B {cost}"
