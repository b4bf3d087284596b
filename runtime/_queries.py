"""Input queries on the worker: each app's script gets exactly its own query's result.

At an EP with an input schema, the client sends the input projected through the union of the
queries it knows to be bound (or, when some app has none, the whole input), and names those
queries in the job (``Job.queries``: app -> sha256 of the query text, "" for an app without
one). Here each app whose binding has a query gets ``project(its plan, what was sent)``: its
own query's result, even in a join or chain where the client sent the union. The plan is the
binding's, compiled once per query against the EP's schema, so a client that had not heard of
a deploy yet never makes a script see another query's shape: nullable fields the old union
lacks come out null, and the report says ``stale``. A script never runs on a partial input:
when the client was stale (or named no queries), an app whose query reads a non-null field
that what was sent lacks (or whose result is null at the root) fails with ``invalid_input``;
so does an app without a query that gets a projection (the client still thought it had one).

Schemas (by the digest of their SDL) and plans (by the digests of SDL and query), and the
errors of those that do not compile, are kept per process, shared by every :class:`EpQueries`:
an EP's runtime is made again whenever its cached definition expires or is invalidated, and
must not rebuild its schema or recompile its queries on a job's path then.

Script data: a query's root ``store(scope:, key:)`` fields are resolved here, for the app, the
job's shop and its session, from the worker's cache (``scriptpool.runtime._store``): the client
never sends them, and what it sent under those names is overridden.

Nothing here runs for an EP without an input schema: its runtime has no :class:`EpQueries`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from scriptpool.config.errors import InvalidInput, ScriptpoolError
from scriptpool.config.wire import query_digest
from scriptpool.runtime._input import ScriptInput
from scriptpool.runtime._store import placeholder, splice

if TYPE_CHECKING:
    from scriptpool.config.input_query import InputSchema, Projection
    from scriptpool.registry import Deployment
    from scriptpool.runtime._store import DataContext

# The client's word on the queries it projected for (ExecutionReport.input_query_client).
CURRENT, STALE, NONE = "current", "stale", "none"
# Schemas and plans kept per process (the oldest goes first): deploys are rare, so these hold
# every live one. A failure to compile is kept too, so that it is not compiled again per job.
_SCHEMAS = 64
_PLANS = 1_024
# The caps a bound query is compiled under here: the deploy held it to its EP's caps, and an EP
# that lowers them later must not break the queries already bound (the widest an EP may set).
_RUN_MAX_BYTES = 65_536
_RUN_MAX_COST = 1_000
# A plan's nodes (the layout scriptpool.config.input_query._projection documents): read here
# only to find the non-null fields a stale input lacks.
_LIST, _OBJECT, _ABSTRACT, _TYPENAME = 1, 2, 3, 4
_MISSING: Any = object()

#: What one app's input query means for its run: (the query's digest or "", what the client sent).
QueryInfo = tuple[str, str]
NO_QUERY: QueryInfo = ("", "")

_lock = threading.Lock()
_schemas: dict[str, InputSchema | ScriptpoolError] = {}
_plans: dict[tuple[str, str], Projection | ScriptpoolError] = {}


class EpQueries:
    """The input schema of one EP and its apps' compiled queries (compiled on first use, once
    per process: graphql-core is imported only then). Thread-safe."""

    def __init__(self, sdl: str) -> None:
        self.sdl = sdl
        self._sdl_digest: str | None = None  # computed with the first plan, off the EP's load
        self._plans: dict[str, Projection | ScriptpoolError] = {}
        # digest -> the plan's root ``store`` selections: (canonical key, scope, key) each.
        self._reads: dict[str, tuple[tuple[str, str, str], ...]] = {}

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

    def input_for(
        self,
        deployment: Deployment,
        data: ScriptInput,
        info: QueryInfo,
        context: DataContext | None = None,
    ) -> ScriptInput:
        """The input ``deployment``'s script gets: its query's result over ``data`` (what the
        client sent), or ``data`` itself for an app without a query when ``data`` is the whole
        input. :class:`InvalidInput` when it is not (``info`` says ``stale``), or when the
        client was not current and the result would lose a value the query declares non-null;
        ``invalid_input_query`` if the bound query does not compile against the schema.

        The query's ``store(scope:, key:)`` fields are read from ``context`` (the worker's data
        of this app, the call's shop and session), whatever the client sent under those
        names; without a context they are null."""
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
        value = data.decoded().json_value
        reads = self._reads.get(info[0])
        if reads is None:
            reads = self._reads[info[0]] = store_reads(plan)
        texts: list[bytes] = []
        if reads and type(value) is dict:
            # The data goes in under each field's canonical key, which the plan reads first:
            # a value the host sent there (or under ``store``) is never what a script sees. A
            # value read goes in as a placeholder, its JSON text spliced into the input's.
            value = dict(value)
            app, shop = deployment.app, deployment.shop_id
            for canonical, scope, key in reads:
                read = None if context is None else context.read(app, shop, scope, key)
                if read is None:
                    value[canonical] = None
                else:
                    value[canonical] = placeholder(len(texts))
                    texts.append(read)
        result = plan.project(value)
        if info[1] != CURRENT:
            # What was sent was projected for other queries (or for none the job names): a
            # non-null field it lacks would null its parents, so the script would run on a
            # partial input.
            lost = _lost(plan.root, value)
            if lost is not None or result is None:
                what = (
                    f"reads the non-null field {lost[1:]!r}, which the input the client sent lacks"
                    if lost is not None
                    else "comes out null at the root over the input the client sent"
                )
                raise InvalidInput(
                    f"app {deployment.app}'s input query {what} ({_standing(info[1])}): not run "
                    "on a partial input; the client's next call sends what the query reads",
                    app=deployment.app,
                    client=info[1],
                    field=None if lost is None else lost[1:],
                )
        if texts:
            return ScriptInput(splice(result, texts))  # decoded only for a MessagePack script
        return ScriptInput(None, (result,))

    def _plan(self, text: str, digest: str) -> Projection:
        found = self._plans.get(digest)
        if found is None:
            if self._sdl_digest is None:
                self._sdl_digest = query_digest(self.sdl)
            found = self._plans[digest] = compiled(self.sdl, self._sdl_digest, text, digest)
        if isinstance(found, ScriptpoolError):
            raise _copy(found)
        return found


def store_reads(plan: Projection) -> tuple[tuple[str, str, str], ...]:
    """The ``store`` fields ``plan`` selects at its root: (canonical key, scope, key) each,
    once per distinct argument set."""
    from scriptpool.config.input_query import STORE_FIELD

    found: dict[str, tuple[str, str, str]] = {}
    root = plan.root
    if root[0] != _OBJECT:
        return ()
    for _key, name, alt, args, _arg_key, _node in root[3]:
        if name == STORE_FIELD and alt is not None and args:
            scope, key = args.get("scope"), args.get("key")
            if type(scope) is str and type(key) is str:
                found[alt] = (alt, scope, key)
    return tuple(found.values())


def compiled(sdl: str, sdl_digest: str, text: str, digest: str) -> Projection | ScriptpoolError:
    """The plan of query ``text`` (its ``digest``) against the schema ``sdl`` (its digest), or
    the named error that refuses it, kept for the process (shared by every EP's runtime)."""
    key = (sdl_digest, digest)
    found = _plans.get(key)
    if found is not None:
        return found
    from scriptpool.config.input_query import InputQuery

    plan: Projection | ScriptpoolError
    try:
        schema = _schema(sdl, sdl_digest)
        if isinstance(schema, ScriptpoolError):
            raise _copy(schema)
        plan = InputQuery.compile(schema, text, max_bytes=_RUN_MAX_BYTES, max_cost=_RUN_MAX_COST).plan()
    except ScriptpoolError as exc:
        plan = exc.with_traceback(None)  # kept without the frames it was raised through
    with _lock:
        _kept(_plans, key, plan, _PLANS)
    return plan


def _schema(sdl: str, sdl_digest: str) -> InputSchema | ScriptpoolError:
    found = _schemas.get(sdl_digest)
    if found is not None:
        return found
    from scriptpool.config.input_query import InputSchema

    schema: InputSchema | ScriptpoolError
    try:
        schema = InputSchema.from_sdl(sdl)
    except ScriptpoolError as exc:
        schema = exc.with_traceback(None)
    with _lock:
        _kept(_schemas, sdl_digest, schema, _SCHEMAS)
    return schema


def _copy(error: ScriptpoolError) -> ScriptpoolError:
    """A kept error raised anew: a fresh object per raise, so that threads raising it at once
    share no traceback or context."""
    return type(error)(error.message, **error.detail)


def _kept(cache: dict[Any, Any], key: Any, value: Any, bound: int) -> None:
    """Put ``value`` in ``cache`` (under the module's lock), the oldest entries going first."""
    while len(cache) >= bound:
        del cache[next(iter(cache))]
    cache[key] = value


def _standing(client: str) -> str:
    if client == STALE:
        return "the client projected it for queries replaced since"
    return "the job names no queries, so it may be projected for others"


def _lost(node: tuple[Any, ...], value: Any) -> str | None:
    """The path of the first non-null field (or abstract type's ``__typename``) that the plan
    ``node`` reads and ``value`` (JSON, what was sent) has no key for, or None."""
    kind = node[0]
    if kind == _LIST:
        if type(value) is list:
            item = node[2]
            for index, element in enumerate(value):
                if element is not None:
                    lost = _lost(item, element)
                    if lost is not None:
                        return f"[{index}]{lost}"
        return None
    if type(value) is not dict:
        return None
    if kind == _OBJECT:
        fields = node[3]
    elif kind == _ABSTRACT:
        type_name = value.get("__typename", _MISSING)
        if type_name is _MISSING:
            return ".__typename" if node[1] else None
        fields = node[2].get(type_name) if type(type_name) is str else None
        if fields is None:
            return None
    else:
        return None
    for _key, name, alt, _args, _arg_key, child in fields:
        if child[0] == _TYPENAME:
            continue
        item = _MISSING if alt is None else value.get(alt, _MISSING)
        if item is _MISSING:
            item = value.get(name, _MISSING)
        if item is _MISSING:
            if child[1]:
                return f".{name}"
            continue
        if item is not None:
            lost = _lost(child, item)
            if lost is not None:
                return f".{name}{lost}"
    return None


def with_query(report: Any, info: QueryInfo) -> Any:
    """``report`` (an ExecutionReport) with the app's query digest and the client's standing."""
    if info == NO_QUERY:
        return report
    import dataclasses

    return dataclasses.replace(report, input_query=info[0], input_query_client=info[1])
