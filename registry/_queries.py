"""Input queries at deploy: a deployment's query checked against its extension point's GraphQL
input schema and caps (``scriptpool.config.input_query``), and the bound queries a change of
that schema or those caps would break.

graphql-core is imported here only when an EP has a schema or a deploy carries a query; the
schema built from an EP's SDL is kept per text, since every deploy to the EP needs it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from scriptpool.config import ExtensionPoint
from scriptpool.config.errors import InvalidInputQuery

if TYPE_CHECKING:
    from scriptpool.config.input_query import InputQuery, InputSchema
    from scriptpool.registry._bindings import Deployment

__all__ = ["broken_queries", "build_input_schema", "check_query", "query_digest"]


@functools.lru_cache(maxsize=16)
def build_input_schema(sdl: str) -> InputSchema:
    """The schema built from ``sdl``, or ``invalid_argument`` naming the problem and its line and
    column (:meth:`InputSchema.from_sdl`). Kept per text: a few EPs, each deployed to often."""
    from scriptpool.config.input_query import InputSchema

    return InputSchema.from_sdl(sdl)


def check_query(definition: ExtensionPoint, text: str) -> InputQuery:
    """``text`` compiled against ``definition``'s input schema and caps, or
    :class:`InvalidInputQuery` (with the problem, line and column; for an EP without a schema,
    saying so at line 1, column 1)."""
    from scriptpool.config.input_query import InputQuery

    if definition.input_graphql is None:
        raise InvalidInputQuery(
            f"input query refused: extension point {definition.name} has no input schema: define it "
            "with --input-graphql SCHEMA.graphql, or deploy without --input-query (the script gets "
            "the whole input) (line 1, column 1)",
            problem=f"extension point {definition.name} has no input schema",
            line=1,
            column=1,
            ep=definition.name,
        )
    return InputQuery.compile(
        build_input_schema(definition.input_graphql),
        text,
        max_bytes=definition.max_query_bytes,
        max_cost=definition.max_query_cost,
    )


def broken_queries(definition: ExtensionPoint, bound: Iterable[tuple[str, Deployment]]) -> list[str]:
    """For each (where, deployment) whose input query ``definition`` would refuse, one line:
    ``where: problem (line L, column C)``."""
    broken = []
    for where, deployment in bound:
        assert deployment.input_query is not None
        try:
            check_query(definition, deployment.input_query)
        except InvalidInputQuery as exc:
            detail = exc.detail
            broken.append(f"{where}: {detail['problem']} (line {detail['line']}, column {detail['column']})")
    return broken


def query_digest(text: str) -> str:
    """The SHA-256 of a query's text (UTF-8), in hex: what ``history`` and ``status`` show of it."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
