"""A script's input query: its size and nesting counted before it is parsed, then parsed,
validated against the EP's :class:`InputSchema`, costed and compiled (:class:`InputQuery`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scriptpool.config.errors import InvalidArgument
from scriptpool.config.input_query._cost import Coster, check_selections
from scriptpool.config.input_query._plan import Compiler
from scriptpool.config.input_query._projection import MAX_PROJECTED_VALUES, Projection
from scriptpool.config.input_query._schema import (
    MAX_LIST_ARGUMENT,
    MAX_QUERY_BYTES,
    MAX_QUERY_COST,
    MAX_QUERY_DEPTH,
    ROOT_TYPE,
    STORE_FIELD,
    InputSchema,
    graphql_location,
    node_location,
    refuse,
)

if TYPE_CHECKING:
    from graphql import DocumentNode, OperationDefinitionNode

__all__ = ["InputQuery", "query_bytes"]

# Whatever the caps, the raw text (comments included) is bounded before anything scans it.
_MAX_RAW_BYTES = 65_536


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
        an unused fragment, ...), not exactly one ``query`` operation, variables (nothing
        would supply their values), introspection, nesting past :data:`MAX_QUERY_DEPTH`, more
        than :data:`MAX_SELECTIONS` fields once fragments are spread, ``store`` selected
        anywhere but the operation's root selection set, a list argument past
        :data:`MAX_LIST_ARGUMENT` elements, more than ``max_bytes`` bytes without comments,
        or a cost past ``max_cost``. The query is compiled into its plan here."""
        from graphql import GraphQLError, OperationDefinitionNode, OperationType, parse, validate

        if not isinstance(text, str):
            raise InvalidArgument("an input query must be GraphQL text")
        if type(max_bytes) is not int or max_bytes < 1 or type(max_cost) is not int or max_cost < 0:
            raise InvalidArgument("an input query's caps must be integers: max_bytes >= 1, max_cost >= 0")
        raw_cap = max(_MAX_RAW_BYTES, 4 * max_bytes)
        if len(text) > raw_cap or len(text.encode("utf-8", "surrogatepass")) > raw_cap:
            raise refuse(f"the query text is over {raw_cap:,} bytes, comments included", 1, 1)
        size, over, deep = _scan(text, max_bytes)
        if over is not None:
            raise refuse(
                f"the query is {size:,} bytes without comments, over the cap of {max_bytes:,}",
                *over,
                measure="bytes",
                value=size,
                cap=max_bytes,
            )
        if deep is not None:
            raise refuse(f"the query nests more than {MAX_QUERY_DEPTH} levels", *deep)
        try:
            document = parse(text)
        except GraphQLError as error:
            raise refuse(error.message, *graphql_location(error)) from None
        operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
        if len(operations) > 1:
            raise refuse(
                f"an input query has exactly one operation, this one has {len(operations)}",
                *node_location(operations[1]),
            )
        for operation in operations:
            if operation.operation is not OperationType.QUERY:
                raise refuse(
                    f"an input query is a query, not a {operation.operation.value}",
                    *node_location(operation),
                )
            if operation.variable_definitions:
                # Nothing supplies variable values when a script runs (a deployment binds the
                # query's text only), so a query with variables would fail on every call.
                definition = operation.variable_definitions[0]
                raise refuse(
                    f"variables are not supported: ${definition.variable.name.value} (an input "
                    "query's arguments are literals)",
                    *node_location(definition),
                )
        if operations:
            # Before validation: graphql-core's rules walk what is written, but the plan and
            # the projection walk the spread fragments, which may multiply without end.
            check_selections(document, operations[0])
        try:
            errors = validate(schema.schema, document, max_errors=1)
        except RecursionError:  # pragma: no cover - bounded by MAX_QUERY_DEPTH; a backstop
            raise refuse(f"the query nests more than {MAX_QUERY_DEPTH} levels", 1, 1) from None
        if errors:
            raise refuse(errors[0].message, *graphql_location(errors[0]))
        if not operations:  # pragma: no cover - validation requires an operation
            raise refuse("the document has no query", 1, 1)
        operation = operations[0]
        _check_store_at_root(schema, document, operation)
        cost = Coster(schema, document, max_cost).run(operation)
        query = cls(schema=schema, text=text, document=document, operation=operation, size=size, cost=cost)
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
            raise refuse(coerced[0].message, *graphql_location(coerced[0]))
        _check_lists(coerced)
        compiler = Compiler(self.schema.schema, self.document, coerced)
        projection = Projection(root=compiler.root(self.operation))
        if len(self._plans) >= 64:
            # Variables come from a few function owners' settings; a bound keeps a caller that
            # passes a new set on every call from growing this without end.
            self._plans.clear()
        self._plans[key] = projection
        return projection

    def project(
        self,
        value: Any,
        *,
        variables: Mapping[str, Any] | None = None,
        max_values: int = MAX_PROJECTED_VALUES,
    ) -> Any:
        """Return the query's result over ``value``: ``self.plan(variables).project(value)``
        (see :meth:`Projection.project` for ``max_values``)."""
        return self.plan(variables).project(value, max_values=max_values)


def _check_store_at_root(
    schema: InputSchema, document: DocumentNode, operation: OperationDefinitionNode
) -> None:
    """Refuse ``Input.store`` selected anywhere but the operation's root selection set (its
    fragments, spread or inline, count as root). The worker resolves only the root's ``store``
    fields; one below it (``Input`` reached from a field, ``type Input { parent: Input }``)
    would be projected from the host's JSON, data the host could forge. Runs after validation:
    every field and type condition exists. Iterative, each fragment walked once per level (a
    chain of spreads may be longer than Python's recursion limit)."""
    from graphql import FieldNode, FragmentDefinitionNode, FragmentSpreadNode, get_named_type

    types = schema.schema.type_map
    root = types.get(ROOT_TYPE)
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    seen: set[tuple[str, bool]] = set()
    stack: list[tuple[Any, Any, bool]] = [(operation.selection_set, root, True)]
    while stack:
        selection_set, parent, at_root = stack.pop()
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                if selection.name.value == STORE_FIELD and parent is root and not at_root:
                    raise refuse("store is selectable only at the root", *node_location(selection))
                if selection.selection_set is not None:
                    field_def = (getattr(parent, "fields", None) or {}).get(selection.name.value)
                    if field_def is not None:
                        stack.append((selection.selection_set, get_named_type(field_def.type), False))
            elif isinstance(selection, FragmentSpreadNode):
                fragment = fragments.get(selection.name.value)
                if fragment is not None and (fragment.name.value, at_root) not in seen:
                    seen.add((fragment.name.value, at_root))
                    condition = types.get(fragment.type_condition.name.value)
                    stack.append((fragment.selection_set, condition, at_root))
            else:  # an inline fragment: its fields are at its parent's level
                condition = selection.type_condition
                inner = parent if condition is None else types.get(condition.name.value)
                stack.append((selection.selection_set, inner, at_root))


def _check_lists(values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        if isinstance(value, list) and len(value) > MAX_LIST_ARGUMENT:
            raise refuse(
                f"variable ${name} has {len(value)} elements, over the cap of {MAX_LIST_ARGUMENT}", 1, 1
            )
