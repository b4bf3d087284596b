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
* Any value may instead be a callable: a loader. It is called only if the query selects its
  field, and at most once per call (per distinct arguments): results are kept in a per-call memo
  keyed by the callable's identity, which a caller may share between projections
  (``memo=``) so that loaders shared by several apps' queries run once. On
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
plan is compiled once per query (and set of variable values) into plain tuples and walked without
graphql-core, which is imported only to build a schema and to compile a query (at deploy, or the
first call that needs a plan), never by ``scriptpool --version`` or by a call without queries.

Caps, as Shopify documents them for Function input queries (an EP may raise both):
:data:`MAX_QUERY_BYTES` (3,000 bytes of query text, comments excluded) and
:data:`MAX_QUERY_COST` (30, counted by :func:`field_cost`'s table). Any refusal is one
:class:`~scriptpool.config.errors.InvalidInputQuery` whose ``detail`` names the ``problem`` and
its ``line`` and ``column``.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scriptpool.config.errors import InvalidArgument, InvalidInputQuery

if TYPE_CHECKING:
    from graphql import (
        DocumentNode,
        FieldNode,
        GraphQLField,
        GraphQLNamedType,
        GraphQLObjectType,
        GraphQLOutputType,
        GraphQLSchema,
        OperationDefinitionNode,
    )

__all__ = [
    "MAX_LIST_ARGUMENT",
    "MAX_QUERY_BYTES",
    "MAX_QUERY_COST",
    "MAX_QUERY_DEPTH",
    "ROOT_TYPE",
    "InputQuery",
    "InputSchema",
    "Projection",
    "field_cost",
    "merge",
    "project",
    "project_async",
    "query_bytes",
]

#: The root type of every input schema: what a query's top-level fields are read from.
ROOT_TYPE = "Input"

#: Shopify's cap on an input query's size, comments excluded (an EP may raise it).
MAX_QUERY_BYTES = 3_000

#: Shopify's cap on an input query's calculated cost (an EP may raise it).
MAX_QUERY_COST = 30

#: Shopify's cap on the elements of one list argument or variable.
MAX_LIST_ARGUMENT = 100

#: Nesting of braces, brackets and parentheses, and of selections once fragments are spread.
#: Not a Shopify rule: graphql-core's validation, the cost walk and the compiler all recurse, and
#: a 3,000-byte query of ``{a{a{a...`` nests 1,500 levels (only recent graphql-core 3.2 releases
#: guard their parser); this keeps every pass far inside Python's recursion limit.
MAX_QUERY_DEPTH = 64

# Whatever the caps, the raw text (comments included) is bounded before anything scans it.
_MAX_RAW_BYTES = 65_536

# Shopify's cost table for Function input queries (shopify.dev, "Shopify Functions" >
# limitations > input query cost; the docs corpus here did not hold that page, so this is the
# published table as we know it, and an EP can override any field's weight with
# ``InputSchema.from_sdl(..., costs=...)``): ``__typename`` 0; any field that returns a
# ``Metafield`` object 3, any field on a ``Metafield`` object 0; ``hasAnyTag``, ``hasTags``,
# ``inAnyCollection`` and ``inCollections`` 3; any other leaf (scalar or enum) field 1; an object
# field costs nothing itself (its leaves are what count). Fields are counted as written, every
# fragment spread counting again, with no factor for list lengths (unknown at deploy).
_METAFIELD_TYPE = "Metafield"
_COST_METAFIELD = 3
_COST_TAGGED = 3
_TAG_AND_COLLECTION_FIELDS = frozenset({"hasAnyTag", "hasTags", "inAnyCollection", "inCollections"})
_COST_LEAF = 1


def _graphql_location(error: Any) -> tuple[int, int]:
    locations = getattr(error, "locations", None) or []
    if locations:
        return locations[0].line, locations[0].column
    return 1, 1


def _node_location(node: Any) -> tuple[int, int]:
    loc = getattr(node, "loc", None)
    if loc is None:
        return 1, 1
    return loc.start_token.line, loc.start_token.column


def _refuse(problem: str, line: int, column: int, **extra: Any) -> InvalidInputQuery:
    return InvalidInputQuery(
        f"input query refused: {problem} (line {line}, column {column})",
        problem=problem,
        line=line,
        column=column,
        **extra,
    )


# -- the schema -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class InputSchema:
    """An extension point's input schema: GraphQL SDL whose root type is ``Input``.

    Build it with :meth:`from_sdl`. ``costs`` maps ``"Type.field"`` to a cost that replaces the
    default table's (see :func:`field_cost`) for that field.
    """

    sdl: str
    schema: GraphQLSchema
    costs: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_sdl(cls, sdl: str, *, costs: Mapping[str, int] | None = None) -> InputSchema:
        """Build the schema from SDL text; refuse it (``invalid_argument``, with the problem and
        its line and column) if it does not parse, is not a valid schema, or has no object type
        ``Input`` to be its query root. Other root operation types it declares are kept (a
        published Function API schema declares its mutations) but no query may use them."""
        from graphql import (
            GraphQLError,
            GraphQLObjectType,
            GraphQLSchema,
            build_schema,
            validate_schema,
        )

        if not isinstance(sdl, str):
            raise InvalidArgument("an input schema must be GraphQL SDL text")
        try:
            built = build_schema(sdl)
        except GraphQLError as error:
            line, column = _graphql_location(error)
            raise InvalidArgument(
                f"input schema refused: {error.message} (line {line}, column {column})",
                problem=error.message,
                line=line,
                column=column,
            ) from None
        root = built.type_map.get(ROOT_TYPE)
        if not isinstance(root, GraphQLObjectType):
            raise InvalidArgument(
                f"input schema refused: it has no object type {ROOT_TYPE!r} to be its root",
                problem=f"no object type {ROOT_TYPE!r}",
                line=1,
                column=1,
            )
        if built.query_type is not None and built.query_type is not root:
            line, column = _node_location(built.query_type.ast_node)
            raise InvalidArgument(
                f"input schema refused: its query root is {built.query_type.name!r}, not "
                f"{ROOT_TYPE!r} (line {line}, column {column})",
                problem=f"query root {built.query_type.name!r} is not {ROOT_TYPE!r}",
                line=line,
                column=column,
            )
        schema = GraphQLSchema(
            query=root,
            mutation=built.mutation_type,
            subscription=built.subscription_type,
            types=list(built.type_map.values()),
            directives=built.directives,
        )
        problems = validate_schema(schema)
        if problems:
            line, column = _graphql_location(problems[0])
            raise InvalidArgument(
                f"input schema refused: {problems[0].message} (line {line}, column {column})",
                problem=problems[0].message,
                line=line,
                column=column,
            )
        for key, value in (costs or {}).items():
            type_name, _, field_name = key.partition(".") if isinstance(key, str) else ("", "", "")
            owner = schema.type_map.get(type_name)
            if field_name not in (getattr(owner, "fields", None) or {}):
                raise InvalidArgument(
                    f"an input cost names a field of the schema as 'Type.field', not {key!r}"
                )
            if type(value) is not int or value < 0:
                raise InvalidArgument(f"the input cost of {key} must be an integer >= 0, not {value!r}")
        return cls(sdl=sdl, schema=schema, costs=dict(costs or {}))


def field_cost(schema: InputSchema, parent: GraphQLNamedType, field_name: str, field_def: Any) -> int:
    """Return one selection of ``parent.field_name``'s cost in an input query: the EP's own
    weight for ``"Parent.field"`` if it set one, else Shopify's table (see the module's
    comment): ``__typename`` 0, a field returning ``Metafield`` 3 and any field on one 0,
    ``hasAnyTag``/``hasTags``/``inAnyCollection``/``inCollections`` 3, any other leaf 1 and
    any other object 0."""
    from graphql import get_named_type, is_leaf_type

    own = schema.costs.get(f"{parent.name}.{field_name}")
    if own is not None:
        return own
    if field_name == "__typename" or parent.name == _METAFIELD_TYPE:
        return 0
    named = get_named_type(field_def.type)
    if named.name == _METAFIELD_TYPE:
        return _COST_METAFIELD
    if field_name in _TAG_AND_COLLECTION_FIELDS:
        return _COST_TAGGED
    return _COST_LEAF if is_leaf_type(named) else 0


# -- size and nesting, before the text is parsed --------------------------------------------------


def _scan(text: str, max_bytes: int) -> tuple[int, tuple[int, int] | None, tuple[int, int] | None]:
    """Count ``text``'s UTF-8 bytes outside comments; return the count, where it first passes
    ``max_bytes`` and where nesting first passes :data:`MAX_QUERY_DEPTH` (line, column, or
    None). Strings and block strings are stepped over so that a ``#`` or brace inside one
    counts as text, not as a comment or nesting."""
    size = 0
    over: tuple[int, int] | None = None
    deep: tuple[int, int] | None = None
    depth = 0
    line, column = 1, 1
    i, n = 0, len(text)
    in_comment = False
    string: str | None = None  # None, '"' or '"""'
    while i < n:
        ch = text[i]
        step = 1
        if in_comment:
            if ch in "\r\n":
                in_comment = False
            else:
                i += 1
                column += 1
                continue
        if string is None and not in_comment:
            if ch == "#":
                in_comment = True
                i += 1
                column += 1
                continue
            if text.startswith('"""', i):
                string, step = '"""', 3
            elif ch == '"':
                string = '"'
            elif ch in "{[(":
                depth += 1
                if depth > MAX_QUERY_DEPTH and deep is None:
                    deep = (line, column)
            elif ch in "}])":
                depth -= 1
        elif string == '"""':
            if text.startswith('\\"""', i):
                step = 4
            elif text.startswith('"""', i):
                string, step = None, 3
        elif string == '"':
            if ch == "\\":
                step = 2
            elif ch == '"' or ch in "\r\n":
                string = None
        for k in range(i, min(i + step, n)):
            c = text[k]
            size += 1 if c < "\x80" else len(c.encode("utf-8", "surrogatepass"))
            if size > max_bytes and over is None:
                over = (line, column)
            if c == "\n" or (c == "\r" and not text.startswith("\n", k + 1)):
                line, column = line + 1, 1
            else:
                column += 1
        i += step
    return size, over, deep


def query_bytes(text: str) -> int:
    """Return the size of a query as the size cap counts it: UTF-8 bytes, comments excluded."""
    return _scan(text, len(text) * 4 + 1)[0]


# -- the compiled plan ----------------------------------------------------------------------------
#
# A plan is plain tuples, walked by _complete/_object below without graphql-core:
#   leaf:     (_LEAF, non_null, fast_type | None, coerce | None)
#   list:     (_LIST, non_null, item_node)
#   object:   (_OBJECT, non_null, type_name, fields)
#   abstract: (_ABSTRACT, non_null, {concrete type name: fields})
# and a field is (response_key, field_name, canonical_key | None, arguments | None,
# argument_key, node); node is _TYPENAME for ``__typename``.

_LEAF, _LIST, _OBJECT, _ABSTRACT = 0, 1, 2, 3
_TYPENAME: tuple[Any, ...] = (4, False)
_MISSING = object()
_INVALID = object()
# Types a host value of which is never a loader: skips callable() on the hot path.
_PLAIN = frozenset({dict, list, tuple, str, int, float, bool})

Field = tuple[str, str, "str | None", "dict[str, Any] | None", str, tuple[Any, ...]]


class _Null(Exception):
    """A null met a non-null type: the nearest nullable parent becomes null (GraphQL's rule)."""


_NULL = _Null()


def _safe(serialize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def coerce(value: Any) -> Any:
        try:
            return serialize(value)
        except Exception:
            # A value the scalar cannot represent: GraphQL makes the field null (with an error
            # the script never sees).
            return _INVALID

    return coerce


def _int_coerce(serialize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    slow = _safe(serialize)

    def coerce(value: Any) -> Any:
        if type(value) is int and -2_147_483_648 <= value <= 2_147_483_647:
            return value
        return slow(value)

    return coerce


def _float_coerce(serialize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    slow = _safe(serialize)

    def coerce(value: Any) -> Any:
        if type(value) is float and math.isfinite(value):
            return value
        return slow(value)

    return coerce


def _enum_coerce(names: frozenset[str], serialize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    slow = _safe(serialize)

    def coerce(value: Any) -> Any:
        if type(value) is str and value in names:
            return value
        return slow(value)

    return coerce


def _call(loader: Any, args: dict[str, Any] | None, arg_key: str, memo: dict[Any, Any], name: str) -> Any:
    key = (id(loader), arg_key)
    hit = memo.get(key, _MISSING)
    if hit is not _MISSING:
        return hit[1]
    value = loader(**args) if args else loader()
    if inspect.isawaitable(value):
        close = getattr(value, "close", None)
        if close is not None:
            close()  # a coroutine never awaited would warn
        raise InvalidArgument(
            f"the loader for input field {name!r} returned an awaitable: use run_async "
            "(project_async) for asynchronous loaders"
        )
    # The loader is kept beside its result so that its id cannot be reused within the call.
    memo[key] = (loader, value)
    return value


async def _call_async(loader: Any, args: dict[str, Any] | None, arg_key: str, memo: dict[Any, Any]) -> Any:
    key = (id(loader), arg_key)
    hit = memo.get(key, _MISSING)
    if hit is not _MISSING:
        value = hit[1]
        if inspect.isawaitable(value):
            # Another branch of this call is awaiting the same loader: share its result.
            value = await value
        return value
    value = loader(**args) if args else loader()
    if inspect.isawaitable(value):
        import asyncio

        task = asyncio.ensure_future(value)
        memo[key] = (loader, task)
        value = await task
    memo[key] = (loader, value)
    return value


def _read(src: Any, name: str, alt: str | None) -> Any:
    if isinstance(src, Mapping):
        if alt is not None:
            value = src.get(alt, _MISSING)
            if value is not _MISSING:
                return value
        return src.get(name)
    return getattr(src, name, None)


def _typename(src: Any) -> Any:
    if type(src) is dict or isinstance(src, Mapping):
        return src.get("__typename")
    return getattr(src, "__typename", None)


def _leaf(node: tuple[Any, ...], value: Any) -> Any:
    fast = node[2]
    if fast is not None and type(value) is fast:
        return value
    coerce = node[3]
    if coerce is None:
        return value
    value = coerce(value)
    if value is _INVALID:
        if node[1]:
            raise _NULL
        return None
    return value


def _object(fields: tuple[Field, ...], type_name: str, src: Any, memo: dict[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mapping = type(src) is dict or isinstance(src, Mapping)
    for key, name, alt, args, arg_key, node in fields:
        if node is _TYPENAME:
            out[key] = type_name
            continue
        if mapping:
            value = _MISSING if alt is None else src.get(alt, _MISSING)
            if value is _MISSING:
                value = src.get(name)
        else:
            value = getattr(src, name, None)
        if value is not None and type(value) not in _PLAIN and callable(value):
            value = _call(value, args, arg_key, memo, name)
        if value is None:
            if node[1]:
                raise _NULL
            out[key] = None
            continue
        kind = node[0]
        if kind == _LEAF:
            fast = node[2]
            out[key] = value if fast is not None and type(value) is fast else _leaf(node, value)
        elif kind == _OBJECT:
            # _complete inlined for the commonest nodes: a call less per field on the hot path.
            try:
                out[key] = _object(node[3], node[2], value, memo)
            except _Null:
                if node[1]:
                    raise
                out[key] = None
        else:
            out[key] = _complete(node, value, memo)
    return out


def _not_a_list(value: Any) -> bool:
    return isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable)


def _object_list(item: tuple[Any, ...], values: Iterable[Any], memo: dict[Any, Any]) -> list[Any]:
    fields, type_name, non_null = item[3], item[2], item[1]
    out: list[Any] = []
    for value in values:
        if value is None:
            if non_null:
                raise _NULL
            out.append(None)
            continue
        try:
            out.append(_object(fields, type_name, value, memo))
        except _Null:
            if non_null:
                raise
            out.append(None)
    return out


def _complete(node: tuple[Any, ...], value: Any, memo: dict[Any, Any]) -> Any:
    if value is None:
        if node[1]:
            raise _NULL
        return None
    kind = node[0]
    if kind == _LEAF:
        return _leaf(node, value)
    try:
        if kind == _OBJECT:
            return _object(node[3], node[2], value, memo)
        if kind == _LIST:
            if type(value) is not list and type(value) is not tuple and _not_a_list(value):
                raise _NULL  # GraphQL: "Expected Iterable": the list is null
            item = node[2]
            if item[0] == _LEAF and item[2] is not None:
                fast = item[2]
                return [v if type(v) is fast else _complete(item, v, memo) for v in value]
            if item[0] == _OBJECT:
                return _object_list(item, value, memo)
            return [_complete(item, v, memo) for v in value]
        type_name = _typename(value)
        fields = node[2].get(type_name) if type(type_name) is str else None
        if fields is None:
            raise _NULL  # GraphQL: an abstract type's value must name a possible type
        return _object(fields, type_name, value, memo)
    except _Null:
        if node[1]:
            raise
        return None


async def _object_async(
    fields: tuple[Field, ...], type_name: str, src: Any, memo: dict[Any, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, name, alt, args, arg_key, node in fields:
        if node is _TYPENAME:
            out[key] = type_name
            continue
        value = _read(src, name, alt)
        if value is not None and type(value) not in _PLAIN and callable(value):
            value = await _call_async(value, args, arg_key, memo)
        out[key] = await _complete_async(node, value, memo)
    return out


async def _complete_async(node: tuple[Any, ...], value: Any, memo: dict[Any, Any]) -> Any:
    if value is None:
        if node[1]:
            raise _NULL
        return None
    kind = node[0]
    if kind == _LEAF:
        return _leaf(node, value)
    try:
        if kind == _OBJECT:
            return await _object_async(node[3], node[2], value, memo)
        if kind == _LIST:
            if type(value) is not list and type(value) is not tuple and _not_a_list(value):
                raise _NULL  # GraphQL: "Expected Iterable": the list is null
            return [await _complete_async(node[2], v, memo) for v in value]
        type_name = _typename(value)
        fields = node[2].get(type_name) if type(type_name) is str else None
        if fields is None:
            raise _NULL
        return await _object_async(fields, type_name, value, memo)
    except _Null:
        if node[1]:
            raise
        return None


@dataclass(frozen=True, eq=False)
class Projection:
    """A compiled input query (or, from :func:`merge`, the union of several): apply it with
    :meth:`project` or :meth:`project_async`. Plain tuples; building one needs graphql-core,
    using one does not."""

    root: tuple[Any, ...]
    #: True for a plan from :func:`merge`: its result is the union form each app's plan reads.
    merged: bool = False

    def project(self, value: Any, *, memo: dict[Any, Any] | None = None) -> Any:
        """Return the query's result over the host value ``value`` (``None`` if a null reached
        the root through non-null fields, as GraphQL's ``data`` would be). Loaders are called
        at most once per ``memo`` (a fresh one per call unless given); one that returns an
        awaitable is refused (``invalid_argument``): use :meth:`project_async`."""
        return _complete(self.root, value, {} if memo is None else memo)

    async def project_async(self, value: Any, *, memo: dict[Any, Any] | None = None) -> Any:
        """Like :meth:`project`, awaiting what a loader returns if it is awaitable (a loader
        shared by two branches is called once and its result awaited once)."""
        return await _complete_async(self.root, value, {} if memo is None else memo)

    def selection(self) -> dict[str, Any]:
        """Return what the plan selects, as nested dicts: a response key (a canonical key in
        a merged plan) maps to None for a leaf or to its own selection; the fields that an
        abstract type's members select sit under ``"... on Type"``."""
        return _describe(self.root) or {}


def _describe(node: tuple[Any, ...]) -> dict[str, Any] | None:
    kind = node[0]
    if kind == _LIST:
        return _describe(node[2])
    if kind == _OBJECT:
        return {f[0]: (None if f[5] is _TYPENAME else _describe(f[5])) for f in node[3]}
    if kind == _ABSTRACT:
        return {
            f"... on {type_name}": {f[0]: (None if f[5] is _TYPENAME else _describe(f[5])) for f in fields}
            for type_name, fields in node[2].items()
        }
    return None


# -- compiling a query ----------------------------------------------------------------------------


def _canonical(name: str, args: dict[str, Any] | None) -> tuple[str | None, str]:
    if not args:
        return None, ""
    arg_key = json.dumps(args, sort_keys=True, separators=(",", ":"), default=str)
    return f"{name}({arg_key})", arg_key


class _Compiler:
    """Turns a validated operation into a plan for one set of variable values."""

    def __init__(self, schema: GraphQLSchema, document: DocumentNode, variables: dict[str, Any]) -> None:
        from graphql import FragmentDefinitionNode

        self.schema = schema
        self.variables = variables
        self.fragments = {
            d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
        }

    def node(self, type_: GraphQLOutputType, field_nodes: list[FieldNode]) -> tuple[Any, ...]:
        from graphql import (
            GraphQLBoolean,
            GraphQLEnumType,
            GraphQLFloat,
            GraphQLID,
            GraphQLInt,
            GraphQLInterfaceType,
            GraphQLList,
            GraphQLNonNull,
            GraphQLObjectType,
            GraphQLString,
            GraphQLUnionType,
        )

        non_null = isinstance(type_, GraphQLNonNull)
        if isinstance(type_, GraphQLNonNull):
            type_ = type_.of_type
        if isinstance(type_, GraphQLList):
            return (_LIST, non_null, self.node(type_.of_type, field_nodes))
        if isinstance(type_, GraphQLObjectType):
            return (_OBJECT, non_null, type_.name, self.fields(type_, field_nodes))
        if isinstance(type_, GraphQLInterfaceType | GraphQLUnionType):
            by_type = {
                member.name: self.fields(member, field_nodes)
                for member in self.schema.get_possible_types(type_)
            }
            return (_ABSTRACT, non_null, by_type)
        # A leaf: the built-in scalars as graphql-core serialises them, with a fast path for a
        # value already of the serialised type; enums checked against their names; any other
        # scalar (Decimal, JSON, ...) passed through, as build_schema's scalars serialise.
        if type_ is GraphQLInt:
            return (_LEAF, non_null, None, _int_coerce(type_.serialize))
        if type_ is GraphQLFloat:
            return (_LEAF, non_null, None, _float_coerce(type_.serialize))
        if type_ is GraphQLString or type_ is GraphQLID:
            return (_LEAF, non_null, str, _safe(type_.serialize))
        if type_ is GraphQLBoolean:
            return (_LEAF, non_null, bool, _safe(type_.serialize))
        if isinstance(type_, GraphQLEnumType):
            return (_LEAF, non_null, None, _enum_coerce(frozenset(type_.values), type_.serialize))
        return (_LEAF, non_null, None, None)

    def fields(self, parent: GraphQLObjectType, field_nodes: list[FieldNode]) -> tuple[Field, ...]:
        from graphql.execution.collect_fields import collect_sub_fields

        collected = collect_sub_fields(self.schema, self.fragments, self.variables, parent, field_nodes)
        return self.plan_fields(parent, collected)

    def plan_fields(
        self, parent: GraphQLObjectType, collected: dict[str, list[FieldNode]]
    ) -> tuple[Field, ...]:
        from graphql.execution.values import get_argument_values

        out: list[Field] = []
        for key, nodes in collected.items():
            name = nodes[0].name.value
            if name == "__typename":
                out.append((key, name, None, None, "", _TYPENAME))
                continue
            field_def: GraphQLField = parent.fields[name]
            args = get_argument_values(field_def, nodes[0], self.variables) if field_def.args else None
            alt, arg_key = _canonical(name, args)
            out.append((key, name, alt, args or None, arg_key, self.node(field_def.type, nodes)))
        return tuple(out)

    def root(self, operation: OperationDefinitionNode) -> tuple[Any, ...]:
        from graphql.execution.collect_fields import collect_fields

        root_type = self.schema.query_type
        assert root_type is not None
        collected = collect_fields(
            self.schema, self.fragments, self.variables, root_type, operation.selection_set
        )
        # The root is nullable: a null that reaches it makes the whole result null.
        return (_OBJECT, False, root_type.name, self.plan_fields(root_type, collected))


@dataclass(frozen=True, eq=False)
class InputQuery:
    """A script's input query, parsed, validated and costed against an :class:`InputSchema`.

    Build it with :meth:`compile`; :meth:`plan` gives the :class:`Projection` for a set of
    variable values (compiled once per set and kept)."""

    schema: InputSchema
    text: str
    document: DocumentNode
    operation: OperationDefinitionNode
    #: The query's size as the cap counts it (UTF-8 bytes without comments) and its cost.
    size: int
    cost: int
    _plans: dict[str, Projection] = field(default_factory=dict, repr=False)

    @classmethod
    def compile(
        cls,
        schema: InputSchema,
        text: str,
        *,
        max_bytes: int = MAX_QUERY_BYTES,
        max_cost: int = MAX_QUERY_COST,
    ) -> InputQuery:
        """Parse ``text``, validate it against ``schema`` and hold it to the caps; refuse it
        with one ``invalid_input_query`` naming the problem and its line and column: a syntax
        error, anything graphql-core's validation rejects (an unknown field, a wrong argument,
        an unused fragment, ...), not exactly one ``query`` operation, introspection, nesting
        past :data:`MAX_QUERY_DEPTH`, a list argument past :data:`MAX_LIST_ARGUMENT`
        elements, more than ``max_bytes`` bytes without comments, or a cost past
        ``max_cost``. A query without variables is compiled into its plan here."""
        from graphql import GraphQLError, OperationDefinitionNode, OperationType, parse, validate

        if not isinstance(text, str):
            raise InvalidArgument("an input query must be GraphQL text")
        if type(max_bytes) is not int or max_bytes < 1 or type(max_cost) is not int or max_cost < 0:
            raise InvalidArgument("an input query's caps must be integers: max_bytes >= 1, max_cost >= 0")
        raw_cap = max(_MAX_RAW_BYTES, 4 * max_bytes)
        if len(text) > raw_cap or len(text.encode("utf-8", "surrogatepass")) > raw_cap:
            raise _refuse(f"the query text is over {raw_cap:,} bytes, comments included", 1, 1)
        size, over, deep = _scan(text, max_bytes)
        if over is not None:
            raise _refuse(
                f"the query is {size:,} bytes without comments, over the cap of {max_bytes:,}",
                *over,
                measure="bytes",
                value=size,
                cap=max_bytes,
            )
        if deep is not None:
            raise _refuse(f"the query nests more than {MAX_QUERY_DEPTH} levels", *deep)
        try:
            document = parse(text)
        except GraphQLError as error:
            raise _refuse(error.message, *_graphql_location(error)) from None
        operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
        if len(operations) > 1:
            raise _refuse(
                f"an input query has exactly one operation, this one has {len(operations)}",
                *_node_location(operations[1]),
            )
        for operation in operations:
            if operation.operation is not OperationType.QUERY:
                raise _refuse(
                    f"an input query is a query, not a {operation.operation.value}",
                    *_node_location(operation),
                )
        try:
            errors = validate(schema.schema, document, max_errors=1)
        except RecursionError:  # pragma: no cover - bounded by MAX_QUERY_DEPTH; a backstop
            raise _refuse(f"the query nests more than {MAX_QUERY_DEPTH} levels", 1, 1) from None
        if errors:
            raise _refuse(errors[0].message, *_graphql_location(errors[0]))
        if not operations:  # pragma: no cover - validation requires an operation
            raise _refuse("the document has no query", 1, 1)
        operation = operations[0]
        cost = _Coster(schema, document, max_cost).run(operation)
        query = cls(schema=schema, text=text, document=document, operation=operation, size=size, cost=cost)
        if not operation.variable_definitions:
            query.plan()
        return query

    @property
    def variable_names(self) -> tuple[str, ...]:
        """The names of the variables the query declares (without ``$``)."""
        return tuple(v.variable.name.value for v in self.operation.variable_definitions or ())

    def plan(self, variables: Mapping[str, Any] | None = None) -> Projection:
        """Return the query's :class:`Projection` for ``variables`` (coerced as GraphQL coerces
        them: a missing one is its default or null; a wrong one is ``invalid_input_query``)."""
        key = json.dumps(variables or {}, sort_keys=True, default=repr)
        found = self._plans.get(key)
        if found is not None:
            return found
        from graphql.execution.values import get_variable_values

        coerced = get_variable_values(
            self.schema.schema, self.operation.variable_definitions or (), dict(variables or {})
        )
        if isinstance(coerced, list):
            raise _refuse(coerced[0].message, *_graphql_location(coerced[0]))
        _check_lists(coerced)
        compiler = _Compiler(self.schema.schema, self.document, coerced)
        projection = Projection(root=compiler.root(self.operation))
        if len(self._plans) >= 64:
            # Variables come from a few function owners' settings; a bound keeps a caller that
            # passes a new set on every call from growing this without end.
            self._plans.clear()
        self._plans[key] = projection
        return projection

    def project(self, value: Any, *, variables: Mapping[str, Any] | None = None) -> Any:
        """Return the query's result over ``value``: ``self.plan(variables).project(value)``."""
        return self.plan(variables).project(value)


def _check_lists(values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        if isinstance(value, list) and len(value) > MAX_LIST_ARGUMENT:
            raise _refuse(
                f"variable ${name} has {len(value)} elements, over the cap of {MAX_LIST_ARGUMENT}", 1, 1
            )


class _Coster:
    """Adds up a query's cost, fragments spread where they are used, refusing it at the field
    that passes the cap or nests past :data:`MAX_QUERY_DEPTH`, or at a list argument past
    :data:`MAX_LIST_ARGUMENT` elements or an introspection field."""

    def __init__(self, schema: InputSchema, document: DocumentNode, cap: int) -> None:
        from graphql import FragmentDefinitionNode

        self.schema = schema
        self.cap = cap
        self.total = 0
        self.fragments = {
            d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
        }

    def run(self, operation: OperationDefinitionNode) -> int:
        root = self.schema.schema.query_type
        assert root is not None
        self.walk(operation.selection_set, root, 0)
        return self.total

    def walk(self, selection_set: Any, parent: Any, depth: int) -> None:
        from graphql import (
            FieldNode,
            FragmentSpreadNode,
            InlineFragmentNode,
            ListValueNode,
            get_named_type,
        )

        if depth > MAX_QUERY_DEPTH:
            raise _refuse(
                f"the query nests more than {MAX_QUERY_DEPTH} levels once fragments are spread",
                *_node_location(selection_set),
            )
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                name = selection.name.value
                if name in ("__schema", "__type"):
                    raise _refuse(f"introspection ({name}) is not input", *_node_location(selection))
                for argument in selection.arguments or ():
                    if (
                        isinstance(argument.value, ListValueNode)
                        and len(argument.value.values) > MAX_LIST_ARGUMENT
                    ):
                        raise _refuse(
                            f"argument {argument.name.value} of {name} has {len(argument.value.values)} "
                            f"elements, over the cap of {MAX_LIST_ARGUMENT}",
                            *_node_location(argument),
                        )
                if name == "__typename":
                    continue
                field_def = parent.fields[name]
                self.total += field_cost(self.schema, parent, name, field_def)
                if self.total > self.cap:
                    raise _refuse(
                        f"the query's cost passes the cap of {self.cap} at field {name!r}",
                        *_node_location(selection),
                        measure="cost",
                        cap=self.cap,
                    )
                if selection.selection_set is not None:
                    self.walk(selection.selection_set, get_named_type(field_def.type), depth + 1)
            elif isinstance(selection, InlineFragmentNode):
                inner = parent
                if selection.type_condition is not None:
                    inner = self.schema.schema.type_map[selection.type_condition.name.value]
                self.walk(selection.selection_set, inner, depth + 1)
            elif isinstance(selection, FragmentSpreadNode):
                fragment = self.fragments[selection.name.value]
                inner = self.schema.schema.type_map[fragment.type_condition.name.value]
                self.walk(fragment.selection_set, inner, depth + 1)


# -- projecting, and merging for joins and chains -------------------------------------------------


def project(
    query: InputQuery | Projection,
    value: Any,
    *,
    variables: Mapping[str, Any] | None = None,
    memo: dict[Any, Any] | None = None,
) -> Any:
    """Return ``query``'s result over the host value ``value`` (see :meth:`Projection.project`)."""
    plan = query.plan(variables) if isinstance(query, InputQuery) else query
    return plan.project(value, memo=memo)


async def project_async(
    query: InputQuery | Projection,
    value: Any,
    *,
    variables: Mapping[str, Any] | None = None,
    memo: dict[Any, Any] | None = None,
) -> Any:
    """Like :func:`project`, awaiting loaders that return awaitables."""
    plan = query.plan(variables) if isinstance(query, InputQuery) else query
    return await plan.project_async(value, memo=memo)


def merge(projections: Sequence[Projection]) -> Projection:
    """Return the plan that loads what any of ``projections`` selects, for a join or chain:
    the host projects its input through it once and sends the result; each app's own
    projection then reads that result as it would the host's input, and gets what it would
    have got from the input itself. The union keeps fields by name (a field with arguments
    under its canonical key, once per distinct argument set), no aliases, ``__typename``
    wherever an abstract type's member decides which fragments apply, and no non-null rule
    (each app's projection applies its own)."""
    if not projections:
        raise InvalidArgument("merge needs at least one projection")
    return Projection(root=_merge_nodes([p.root for p in projections]), merged=True)


def _merge_nodes(nodes: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    first = nodes[0]
    kind = first[0]
    if kind == _LEAF:
        return (_LEAF, False, first[2], first[3])
    if kind == _LIST:
        return (_LIST, False, _merge_nodes([n[2] for n in nodes]))
    if kind == _OBJECT:
        return (_OBJECT, False, first[2], _merge_fields([n[3] for n in nodes], typename=False))
    members: dict[str, list[tuple[Field, ...]]] = {}
    for n in nodes:
        for type_name, fields in n[2].items():
            members.setdefault(type_name, []).append(fields)
    return (
        _ABSTRACT,
        False,
        {type_name: _merge_fields(lists, typename=True) for type_name, lists in members.items()},
    )


def _merge_fields(lists: list[tuple[Field, ...]], *, typename: bool) -> tuple[Field, ...]:
    entries: dict[str, tuple[str, str | None, dict[str, Any] | None, str, list[tuple[Any, ...]]]] = {}
    for fields in lists:
        for _key, name, alt, args, arg_key, node in fields:
            if node is _TYPENAME:
                continue
            canonical = alt or name
            entry = entries.get(canonical)
            if entry is None:
                entries[canonical] = (name, alt, args, arg_key, [node])
            else:
                entry[4].append(node)
    merged: list[Field] = []
    if typename:
        merged.append(("__typename", "__typename", None, None, "", _TYPENAME))
    for canonical, (name, alt, args, arg_key, nodes) in entries.items():
        merged.append((canonical, name, alt, args, arg_key, _merge_nodes(nodes)))
    return tuple(merged)
