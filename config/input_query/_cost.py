"""An input query's cost, as Shopify counts it for Function input queries, and the walk that
adds it up at deploy (refusing a query at the field that passes the cap)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scriptpool.config.input_query._schema import (
    MAX_LIST_ARGUMENT,
    MAX_QUERY_DEPTH,
    InputSchema,
    node_location,
    refuse,
)

if TYPE_CHECKING:
    from graphql import DocumentNode, GraphQLNamedType, OperationDefinitionNode

__all__ = ["Coster", "field_cost"]

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
            raise refuse(
                f"the query nests more than {MAX_QUERY_DEPTH} levels once fragments are spread",
                *node_location(selection_set),
            )
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                name = selection.name.value
                if name in ("__schema", "__type"):
                    raise refuse(f"introspection ({name}) is not input", *node_location(selection))
                for argument in selection.arguments or ():
                    if (
                        isinstance(argument.value, ListValueNode)
                        and len(argument.value.values) > MAX_LIST_ARGUMENT
                    ):
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
                fragment = self.fragments[selection.name.value]
                inner = self.schema.schema.type_map[fragment.type_condition.name.value]
                self.walk(fragment.selection_set, inner, depth + 1)
