"""Input queries: an extension point's input schema in GraphQL SDL, a script's query against it,
and the projection that gives the script exactly that query's result.

An EP may publish its input as a GraphQL schema whose root type is ``Input`` (as Shopify's
Function APIs publish theirs); each deployed script may then carry a query against it. At deploy
:meth:`InputQuery.compile` parses the query, validates it against the schema with graphql-core,
holds it to a size cap and a cost cap and compiles it, once, into a :class:`Projection`: a plan of
plain tuples. On every call the host hands its full input (or loaders for parts of it) to
:meth:`Projection.project`, which returns what GraphQL execution of the query over that input
would return with the default resolver: the selected fields only, in the query's order, under
their aliases, fragments applied by ``__typename``, ``null`` where the host has no value (and a
``null`` in a non-null field nulling its parent, as GraphQL does), lists projected element-wise
and the built-in scalars serialised as graphql-core serialises them.

How the host supplies values:

* A mapping is read by field name (any other object by attribute, as graphql-core's default
  resolver reads it).
* Any value may instead be a callable: a loader (a field's value, a list's element, or the
  whole input). It is called only if the query selects it, and at most once per call (per
  distinct arguments): results are kept in a per-call memo keyed by the callable's identity,
  which a caller may share between projections (``memo=``) so that loaders shared by several
  apps' queries run once. On
  :meth:`Projection.project_async` a loader may return an awaitable, which is awaited.
* A field with arguments (``metafield(namespace: "app", key: "config")``, ``hasAnyTag(tags:
  [...])``): the host's value for the field is a callable that takes the coerced arguments as
  keywords (``metafield=lambda namespace, key: ...``), called once per distinct argument set.
  A plain value is used for every argument set. This is the default resolver's contract without
  its ``info`` argument, which a host has no use for.

Joins and chains: :func:`merge` combines several apps' projections into one that loads their
union (fields by name, fields with arguments under a canonical key ``name({"arg":...})``, and
``__typename`` wherever a type condition needs it). The host projects its input through the
merged plan once and sends that; each app's own projection then reads the union exactly as it
reads a host value, so every app sees only its own query's result and the input crosses the
queue once (:func:`merge` keeps ``project(app, project(merged, x)) == project(app, x)``).

Technique, chosen by measurement (``scripts/bench_input_query.py``: a 200-line cart with full
product data, 132 kB of JSON, and a query selecting 19.5 kB of it, with one host loader per line
for ``hasAnyTag(tags:)``; medians per call of 500, on the development machine): the compiled
projection takes 0.55 ms; graphql-core's ``execute_sync`` with its default resolvers over the same
dict takes 4.0 ms (over 7 times as long, and the document is parsed and validated outside that
time). ``json.dumps`` of the full input takes 1.2 ms and of the projection 0.24 ms, so projecting
and then encoding the selection (0.8 ms) costs less than encoding the full input would. So the
plan is compiled once per query into plain tuples and walked without
graphql-core, which is imported only to build a schema and to compile a query (at deploy, or the
first call that needs a plan), never by ``scriptpool --version`` or by a call without queries.

Caps, as Shopify documents them for Function input queries (an EP may raise both):
:data:`MAX_QUERY_BYTES` (3,000 bytes of query text, comments excluded) and
:data:`MAX_QUERY_COST` (30, counted by :func:`field_cost`'s table). Beyond Shopify's, the same
for every EP: :data:`MAX_QUERY_DEPTH`, :data:`MAX_LIST_ARGUMENT`, no variables (nothing supplies
their values when a script runs), and :data:`MAX_SELECTIONS` fields once fragments are spread
(every field and alias, those that cost nothing included: aliases multiplied through fragments
are not bounded by the cost cap). Any refusal is one
:class:`~scriptpool.config.errors.InvalidInputQuery` whose ``detail`` names the ``problem`` and
its ``line`` and ``column``. A projection builds at most :data:`MAX_PROJECTED_VALUES` values
(each list charged before its elements are built), past which it fails with
:class:`~scriptpool.config.errors.InputTooLarge`.

Its private modules, one concept each: ``_schema`` (the schema, the caps, the refusal),
``_cost`` (the cost table and walk), ``_query`` (size, parsing, validation: :class:`InputQuery`),
``_plan`` (compiling a query into a plan), ``_projection`` (the plan's walk:
:class:`Projection`) and ``_merge`` (:func:`project` and :func:`merge` for joins and chains).
"""

from scriptpool.config.input_query._cost import field_cost
from scriptpool.config.input_query._merge import merge, project, project_async
from scriptpool.config.input_query._projection import MAX_PROJECTED_VALUES, Projection
from scriptpool.config.input_query._query import InputQuery, query_bytes
from scriptpool.config.input_query._schema import (
    MAX_LIST_ARGUMENT,
    MAX_QUERY_BYTES,
    MAX_QUERY_COST,
    MAX_QUERY_DEPTH,
    MAX_SELECTIONS,
    ROOT_TYPE,
    STORE_COST,
    STORE_FIELD,
    STORE_SCOPES,
    STORE_SDL,
    InputSchema,
)

__all__ = [
    "MAX_LIST_ARGUMENT",
    "MAX_PROJECTED_VALUES",
    "MAX_QUERY_BYTES",
    "MAX_QUERY_COST",
    "MAX_QUERY_DEPTH",
    "MAX_SELECTIONS",
    "ROOT_TYPE",
    "STORE_COST",
    "STORE_FIELD",
    "STORE_SCOPES",
    "STORE_SDL",
    "InputQuery",
    "InputSchema",
    "Projection",
    "field_cost",
    "merge",
    "project",
    "project_async",
    "query_bytes",
]
