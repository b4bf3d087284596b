"""Input queries on the worker: each app's script gets exactly its own query's result.

At an EP with an input schema, the client sends the input projected through the union of the
queries it knows to be bound (or, when some app has none, the whole input), and names those
queries in the job (``Job.queries``: app -> sha256 of the query text, "" for an app without
one). Here each app whose binding has a query gets ``project(its plan, what was sent)``: its
own query's result, even in a join or chain where the client sent the union. The plan is the
binding's, compiled once per query (by digest) against the EP's schema, so a client that had
not heard of a deploy yet never makes a script see another query's shape: fields the old union
lacks come out null, and the report says ``stale``. An app without a query gets what was sent
only if that is the whole input; if the client sent a projection (it still thought the app had
a query), the app's part fails with ``invalid_input`` rather than run on a partial input.

Nothing here runs for an EP without an input schema: its runtime has no :class:`EpQueries`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from scriptpool.config.errors import InvalidInput
from scriptpool.config.wire import query_digest
from scriptpool.runtime._input import ScriptInput

if TYPE_CHECKING:
    from scriptpool.config.input_query import InputSchema, Projection
    from scriptpool.registry import Deployment

# The client's word on the queries it projected for (ExecutionReport.input_query_client).
CURRENT, STALE, NONE = "current", "stale", "none"
# Plans kept per EP schema, by query digest: deploys are rare, so this holds every live one.
_PLANS = 1_024
# The caps a bound query is compiled under here: the deploy held it to its EP's caps, and an EP
# that lowers them later must not break the queries already bound (the widest an EP may set).
_RUN_MAX_BYTES = 65_536
_RUN_MAX_COST = 1_000

#: What one app's input query means for its run: (the query's digest or "", what the client sent).
QueryInfo = tuple[str, str]
NO_QUERY: QueryInfo = ("", "")


class EpQueries:
    """The input schema of one EP (built on first use: graphql-core is imported only then) and
    its apps' compiled queries. Thread-safe."""

    def __init__(self, sdl: str) -> None:
        self.sdl = sdl
        self._schema: InputSchema | None = None
        self._plans: dict[str, Projection] = {}
        self._lock = threading.Lock()

    def info(self, deployment: Deployment, sent: dict[str, str] | None) -> QueryInfo:
        """The digest of ``deployment``'s query and the client's standing: ``current`` if the
        job names that query among those it projected for, ``stale`` if it names others (or the
        app without a query, whose input was projected), ``none`` for a job naming none."""
        text = deployment.input_query
        if text is None:
            return NO_QUERY if sent is None or "" in sent.values() else ("", STALE)
        digest = query_digest(text)
        if sent is None:
            return digest, NONE
        return digest, CURRENT if digest in sent.values() else STALE

    def input_for(self, deployment: Deployment, data: ScriptInput, info: QueryInfo) -> ScriptInput:
        """The input ``deployment``'s script gets: its query's result over ``data`` (what the
        client sent), or ``data`` itself for an app without a query when ``data`` is the whole
        input. :class:`InvalidInput` when it is not (``info`` says ``stale``);
        ``invalid_input_query`` if the bound query does not compile against the schema."""
        text = deployment.input_query
        if text is None:
            if info[1] == STALE:
                raise InvalidInput(
                    f"app {deployment.app} has no input query, but the client sent the input projected "
                    "for the queries it knew of (it had not yet heard of the deploy): not run on a "
                    "partial input; the client's next call sends the whole input",
                    app=deployment.app,
                    client=STALE,
                )
            return data
        plan = self._plan(text, info[0])
        return ScriptInput(None, (plan.project(data.decoded().json_value),))

    def _plan(self, text: str, digest: str) -> Projection:
        found = self._plans.get(digest)
        if found is not None:
            return found
        from scriptpool.config.input_query import InputQuery, InputSchema

        with self._lock:
            if self._schema is None:
                self._schema = InputSchema.from_sdl(self.sdl)
            schema = self._schema
        plan = InputQuery.compile(schema, text, max_bytes=_RUN_MAX_BYTES, max_cost=_RUN_MAX_COST).plan()
        with self._lock:
            if len(self._plans) >= _PLANS:
                self._plans.clear()
            self._plans[digest] = plan
        return plan


def with_query(report: Any, info: QueryInfo) -> Any:
    """``report`` (an ExecutionReport) with the app's query digest and the client's standing."""
    if info == NO_QUERY:
        return report
    import dataclasses

    return dataclasses.replace(report, input_query=info[0], input_query_client=info[1])
