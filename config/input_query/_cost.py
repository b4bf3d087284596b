"""An input query's cost, as Shopify counts it for Function input queries, and the walk that
adds it up at deploy (refusing a query at the field that passes the cap); and the count of the
fields it selects once its fragments are spread (refused past :data:`MAX_SELECTIONS`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from scriptpool.config.input_query._schema import (
    MAX_LIST_ARGUMENT,
    MAX_QUERY_DEPTH,
    MAX_SELECTIONS,
    InputSchema,
    node_location,
    refuse,
)

if TYPE_CHECKING:
    from graphql import DocumentNode, GraphQLNamedType, OperationDefinitionNode

__all__ = ["Coster", "check_selections", "field_cost", "fragment_order"]

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


class Coster:
    """Adds up a query's cost, fragments spread where they are used, refusing it at the field
    that passes the cap or nests past :data:`MAX_QUERY_DEPTH`, or at a list argument past
    :data:`MAX_LIST_ARGUMENT` elements or an introspection field.

    A fragment's cost, its height (how deep it nests once spread) and whether it holds a field
    this walk refuses do not depend on where it is spread: they are worked out once per
    fragment (in :func:`fragment_order`, without recursing from fragment to fragment) and added
    at each spread. The walk enters a spread only when that summary says it will refuse there,
    so it follows one path to the refusal and finds the same place as walking every spread
    would (which took time exponential in spreads of spreads: 2 ** 60 walks for a 2.4 kB
    chain)."""

    def __init__(self, schema: InputSchema, document: DocumentNode, cap: int) -> None:
        from graphql import FragmentDefinitionNode

        self.schema = schema
        self.cap = cap
        self.total = 0
        self.fragments = {
            d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
        }
        # name -> (cost, height, refused inside): filled in dependency order before the walk.
        self.summaries: dict[str, tuple[int, int, bool]] = {}
        for name in fragment_order(self.fragments)[0]:
            fragment = self.fragments[name]
            inner = self.schema.schema.type_map[fragment.type_condition.name.value]
            self.summaries[name] = self.summary(fragment.selection_set, inner)

    def run(self, operation: OperationDefinitionNode) -> int:
        root = self.schema.schema.query_type
        assert root is not None
        self.walk(operation.selection_set, root, 0)
        return self.total

    def summary(self, selection_set: Any, parent: Any) -> tuple[int, int, bool]:
        """Return a selection set's (cost, height, refused inside), its fragments' from
        :attr:`summaries` (recursing only as deep as the text nests, which the scan bounds)."""
        from graphql import FieldNode, FragmentSpreadNode, InlineFragmentNode, get_named_type

        cost, height, bad = 0, 0, False
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                name = selection.name.value
                if name in ("__schema", "__type") or _long_list_argument(selection) is not None:
                    bad = True
                    continue
                if name == "__typename":
                    continue
                field_def = parent.fields[name]
                cost += field_cost(self.schema, parent, name, field_def)
                if selection.selection_set is not None:
                    c, h, b = self.summary(selection.selection_set, get_named_type(field_def.type))
                    cost, height, bad = cost + c, max(height, h + 1), bad or b
            elif isinstance(selection, InlineFragmentNode):
                inner = parent
                if selection.type_condition is not None:
                    inner = self.schema.schema.type_map[selection.type_condition.name.value]
                c, h, b = self.summary(selection.selection_set, inner)
                cost, height, bad = cost + c, max(height, h + 1), bad or b
            elif isinstance(selection, FragmentSpreadNode):
                # Validation refused cycles, so a fragment's own spreads were summarised first.
                c, h, b = self.summaries[selection.name.value]
                cost, height, bad = cost + c, max(height, h + 1), bad or b
        return cost, height, bad

    def walk(self, selection_set: Any, parent: Any, depth: int) -> None:
        from graphql import FieldNode, FragmentSpreadNode, InlineFragmentNode, get_named_type

        if depth > MAX_QUERY_DEPTH:
            raise refuse(
                f"the query nests more than {MAX_QUERY_DEPTH} levels once fragments are spread",
                *node_location(selection_set),
            )
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                name = selection.name.value
                if name in ("__schema", "__type"):
                    raise refuse(f"introspection ({name}) is not input", *node_location(selection))
                argument = _long_list_argument(selection)
                if argument is not None:
                    raise refuse(
                        f"argument {argument.name.value} of {name} has {len(argument.value.values)} "
                        f"elements, over the cap of {MAX_LIST_ARGUMENT}",
                        *node_location(argument),
                    )
                if name == "__typename":
                    continue
                field_def = parent.fields[name]
                self.total += field_cost(self.schema, parent, name, field_def)
                if self.total > self.cap:
                    raise refuse(
                        f"the query's cost passes the cap of {self.cap} at field {name!r}",
                        *node_location(selection),
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
                cost, height, bad = self.summaries[selection.name.value]
                if bad or self.total + cost > self.cap or depth + 1 + height > MAX_QUERY_DEPTH:
                    # The walk refuses inside this spread: enter it to find where.
                    fragment = self.fragments[selection.name.value]
                    inner = self.schema.schema.type_map[fragment.type_condition.name.value]
                    self.walk(fragment.selection_set, inner, depth + 1)
                else:
                    self.total += cost


def _long_list_argument(field: Any) -> Any:
    """Return ``field``'s first list argument past :data:`MAX_LIST_ARGUMENT` elements, or None."""
    from graphql import ListValueNode

    for argument in field.arguments or ():
        if isinstance(argument.value, ListValueNode) and len(argument.value.values) > MAX_LIST_ARGUMENT:
            return argument
    return None


def fragment_order(fragments: Mapping[str, Any]) -> tuple[list[str], bool]:
    """Return the names of ``fragments`` with every fragment after those it spreads, found
    without recursing from fragment to fragment (a chain of spreads may be longer than Python's
    recursion limit; the text's own nesting is bounded by the scan), and whether a cycle of
    spreads was cut to order them. A spread of an unknown fragment is skipped (validation
    refuses it, and the cycle)."""
    spreads = {name: _spreads(fragment.selection_set) for name, fragment in fragments.items()}
    order: list[str] = []
    cyclic = False
    state: dict[str, int] = {}  # 1 while its spreads are being ordered, 2 once it is placed
    for start in fragments:
        if start in state:
            continue
        state[start] = 1
        stack = [(start, iter(spreads[start]))]
        while stack:
            name, pending = stack[-1]
            for child in pending:
                if child in spreads and child not in state:
                    state[child] = 1
                    stack.append((child, iter(spreads[child])))
                    break
                cyclic = cyclic or state.get(child) == 1
            else:
                stack.pop()
                state[name] = 2
                order.append(name)
    return order, cyclic


def _spreads(selection_set: Any) -> list[str]:
    from graphql import FieldNode, FragmentSpreadNode

    names: list[str] = []
    for selection in selection_set.selections:
        if isinstance(selection, FragmentSpreadNode):
            names.append(selection.name.value)
        elif not isinstance(selection, FieldNode) or selection.selection_set is not None:
            names.extend(_spreads(selection.selection_set))
    return names


def check_selections(document: DocumentNode, operation: OperationDefinitionNode) -> None:
    """Refuse the operation if it selects more than :data:`MAX_SELECTIONS` fields once its
    fragments are spread (every field and alias counted, ``__typename`` and other fields that
    cost nothing included), at the field where the count passes the cap. Runs on the parsed
    document, before validation: each fragment is counted once (in :func:`fragment_order`) and
    its count added at each spread, so a query whose spreads multiply to millions of fields is
    refused in time linear in its text."""
    from graphql import FieldNode, FragmentDefinitionNode, FragmentSpreadNode

    cap = MAX_SELECTIONS
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    sizes: dict[int, int] = {}  # id(selection set) -> its count, at most cap + 1
    counts: dict[str, int] = {}  # fragment -> its count (an unknown one or a cycle counts 0)

    def size(selection_set: Any) -> int:
        found = sizes.get(id(selection_set))
        if found is not None:
            return found
        total = 0
        for selection in selection_set.selections:
            if isinstance(selection, FragmentSpreadNode):
                total += counts.get(selection.name.value, 0)
            else:
                if isinstance(selection, FieldNode):
                    total += 1
                if selection.selection_set is not None:
                    total += size(selection.selection_set)
            if total > cap:
                total = cap + 1  # saturated: counts stay small however the spreads multiply
                break
        sizes[id(selection_set)] = total
        return total

    order, cyclic = fragment_order(fragments)
    if cyclic:
        # Validation refuses the cycle (without expanding it); counts cut at a cycle would not
        # be the same from every side, so the search below could go round it.
        return
    for name in order:
        counts[name] = size(fragments[name].selection_set)
    if size(operation.selection_set) <= cap:
        return
    # Find the field that passes the cap: skip whole selections that fit, enter the one that
    # does not (one path down, without recursion: spreads may chain deeper than Python allows).
    total = 0
    selection_set: Any = operation.selection_set
    while True:
        for selection in selection_set.selections:
            if isinstance(selection, FragmentSpreadNode):
                count = counts.get(selection.name.value, 0)
                if total + count > cap:
                    selection_set = fragments[selection.name.value].selection_set
                    break
                total += count
                continue
            if isinstance(selection, FieldNode):
                total += 1
                if total > cap:
                    raise refuse(
                        f"the query selects more than {cap:,} fields once fragments are spread "
                        f"(aliases and __typename included), passing the cap at field "
                        f"{(selection.alias or selection.name).value!r}",
                        *node_location(selection),
                        measure="selections",
                        cap=cap,
                    )
            inner = selection.selection_set
            if inner is not None:
                if total + size(inner) > cap:
                    selection_set = inner
                    break
                total += size(inner)
        else:  # pragma: no cover - the count said the cap is passed inside this set
            raise AssertionError("the selection count passed its cap nowhere")
