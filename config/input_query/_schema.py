"""The input schema (GraphQL SDL whose root type is ``Input``), the caps every query is held to,
and the one way a query is refused (:func:`refuse`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scriptpool.config.errors import InvalidArgument, InvalidInputQuery

if TYPE_CHECKING:
    from graphql import GraphQLSchema

__all__ = [
    "MAX_LIST_ARGUMENT",
    "MAX_QUERY_BYTES",
    "MAX_QUERY_COST",
    "MAX_QUERY_DEPTH",
    "MAX_SELECTIONS",
    "ROOT_TYPE",
    "STORE_COST",
    "STORE_COST_KEY",
    "STORE_FIELD",
    "STORE_SCOPES",
    "STORE_SCOPE_TYPE",
    "STORE_SDL",
    "STORE_SIGNATURE",
    "STORE_VALUE_TYPE",
    "InputSchema",
    "graphql_location",
    "node_location",
    "refuse",
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

#: Script data, which every input schema offers (added unless the SDL declares it identically):
#: ``store(scope: StoreScope!, key: String!): JSON`` on ``Input``, its value resolved by the
#: worker from data it holds (``scriptpool.runtime._store``), never loaded or sent by the host.
STORE_FIELD = "store"
STORE_VALUE_TYPE = "JSON"
STORE_SCOPE_TYPE = "StoreScope"
STORE_SCOPES = ("APP", "SHOP", "SESSION")
STORE_SIGNATURE = f"{STORE_FIELD}(scope: {STORE_SCOPE_TYPE}!, key: String!): {STORE_VALUE_TYPE}"
#: What the SDL of every input schema is taken to include (shown by the README).
STORE_SDL = (
    f"scalar {STORE_VALUE_TYPE}\nenum {STORE_SCOPE_TYPE} {{ {' '.join(STORE_SCOPES)} }}\n"
    f"extend type {ROOT_TYPE} {{ {STORE_SIGNATURE} }}\n"
)
#: One selection of ``store`` costs as a metafield does (3): it is a keyed read of stored data.
#: An EP's ``costs`` may set another under :data:`STORE_COST_KEY`.
STORE_COST = 3
STORE_COST_KEY = f"{ROOT_TYPE}.{STORE_FIELD}"

#: Fields a query may select once its fragments are spread: every field and alias counted as
#: often as it is reached, ``__typename`` and the other fields that cost nothing included. Not a
#: Shopify rule, and the same for every EP: the cost cap does not bound a query's size, since
#: fields that cost 0 (``__typename``, object fields, fields in a ``Metafield``) may be aliased
#: and spread without end (five fragments of 16 aliases each select 16 ** 5 fields in 1.4 kB).
#: 2,000 leaves room for the highest cost cap an EP may set (1,000, a leaf costing at least 1)
#: with the objects that hold those leaves, and keeps a plan, and each object the projection
#: builds from it, small.
MAX_SELECTIONS = 2_000


def graphql_location(error: Any) -> tuple[int, int]:
    """Return a GraphQL error's first (line, column), or (1, 1) if it has none."""
    locations = getattr(error, "locations", None) or []
    if locations:
        return locations[0].line, locations[0].column
    return 1, 1


def node_location(node: Any) -> tuple[int, int]:
    """Return where a parsed node starts (line, column), or (1, 1) if unknown."""
    loc = getattr(node, "loc", None)
    if loc is None:
        return 1, 1
    return loc.start_token.line, loc.start_token.column


def refuse(problem: str, line: int, column: int, **extra: Any) -> InvalidInputQuery:
    """Return the one error an input query is refused with, naming the problem and where."""
    return InvalidInputQuery(
        f"input query refused: {problem} (line {line}, column {column})",
        problem=problem,
        line=line,
        column=column,
        **extra,
    )


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
            build_ast_schema,
            parse,
            validate_schema,
        )
        from graphql.validation.validate import validate_sdl

        if not isinstance(sdl, str):
            raise InvalidArgument("an input schema must be GraphQL SDL text")
        try:
            document = parse(sdl)
            # build_schema would check the SDL too, but raise a TypeError without a location
            # (an unknown type, a field defined twice): checked here, each error is placed.
            errors = validate_sdl(document)
            if errors:
                raise errors[0]
            built = build_ast_schema(document, assume_valid_sdl=True)
        except GraphQLError as error:
            line, column = graphql_location(error)
            raise InvalidArgument(
                f"input schema refused: {error.message} (line {line}, column {column})",
                problem=error.message,
                line=line,
                column=column,
            ) from None
        except (TypeError, RecursionError) as error:  # what the SDL checks do not catch
            raise InvalidArgument(
                f"input schema refused: {error} (line 1, column 1)", problem=str(error), line=1, column=1
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
            line, column = node_location(built.query_type.ast_node)
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
        schema = _with_store(schema)
        problems = validate_schema(schema)
        if problems:
            line, column = graphql_location(problems[0])
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
        return cls(sdl=sdl, schema=schema, costs={STORE_COST_KEY: STORE_COST, **(costs or {})})


def _with_store(schema: GraphQLSchema) -> GraphQLSchema:
    """``schema`` with what every input schema has for script data (:data:`STORE_SDL`): the
    ``JSON`` scalar, the ``StoreScope`` enum and ``Input.store``, each added unless the SDL
    declares it identically; one it declares otherwise is refused (``invalid_argument`` at
    its declaration), since queries select ``store`` by this exact signature."""
    from graphql import (
        GraphQLEnumType,
        GraphQLNonNull,
        GraphQLScalarType,
        Undefined,
        extend_schema,
        get_named_type,
        parse,
    )

    missing: list[str] = []
    json_type = schema.type_map.get(STORE_VALUE_TYPE)
    if json_type is None:
        missing.append(f"scalar {STORE_VALUE_TYPE}")
    elif not isinstance(json_type, GraphQLScalarType) or json_type.ast_node is None:
        _conflict(json_type, f"type {STORE_VALUE_TYPE!r} must be declared as `scalar {STORE_VALUE_TYPE}`")
    scope_type = schema.type_map.get(STORE_SCOPE_TYPE)
    if scope_type is None:
        missing.append(f"enum {STORE_SCOPE_TYPE} {{ {' '.join(STORE_SCOPES)} }}")
    elif not isinstance(scope_type, GraphQLEnumType) or set(scope_type.values) != set(STORE_SCOPES):
        _conflict(
            scope_type,
            f"type {STORE_SCOPE_TYPE!r} must be declared as `enum {STORE_SCOPE_TYPE} "
            f"{{ {' '.join(STORE_SCOPES)} }}`",
        )
    root = schema.query_type
    assert root is not None
    declared = root.fields.get(STORE_FIELD)
    if declared is None:
        missing.append(f"extend type {ROOT_TYPE} {{ {STORE_SIGNATURE} }}")
    else:
        args = declared.args
        same = (
            not isinstance(declared.type, GraphQLNonNull)
            and get_named_type(declared.type).name == STORE_VALUE_TYPE
            and list(args) == ["scope", "key"]
            and str(args["scope"].type) == f"{STORE_SCOPE_TYPE}!"
            and str(args["key"].type) == "String!"
            and all(a.default_value is Undefined for a in args.values())
        )
        if not same:
            _conflict(
                declared,
                f"field {ROOT_TYPE}.{STORE_FIELD} is script data's: declare it as "
                f"`{STORE_SIGNATURE}` or not at all",
            )
    if not missing:
        return schema
    return extend_schema(schema, parse("\n".join(missing)), assume_valid=True)


def _conflict(declared: Any, problem: str) -> None:
    line, column = node_location(getattr(declared, "ast_node", None))
    raise InvalidArgument(
        f"input schema refused: {problem} (line {line}, column {column})",
        problem=problem,
        line=line,
        column=column,
    )
