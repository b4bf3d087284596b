"""Compiling a validated query, for one set of variable values, into a :class:`Projection`'s
plan of plain tuples."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from scriptpool.config.input_query._projection import (
    ABSTRACT,
    LEAF,
    LIST,
    OBJECT,
    TYPENAME,
    Field,
    enum_coerce,
    float_coerce,
    int_coerce,
    plan_size,
    safe,
)

if TYPE_CHECKING:
    from graphql import (
        DocumentNode,
        FieldNode,
        GraphQLField,
        GraphQLObjectType,
        GraphQLOutputType,
        GraphQLSchema,
        OperationDefinitionNode,
    )

__all__ = ["Compiler"]


def _canonical(name: str, args: dict[str, Any] | None) -> tuple[str | None, str]:
    if not args:
        return None, ""
    arg_key = json.dumps(args, sort_keys=True, separators=(",", ":"), default=str)
    return f"{name}({arg_key})", arg_key


class Compiler:
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
            item = self.node(type_.of_type, field_nodes)
            return (LIST, non_null, item, plan_size(item))
        if isinstance(type_, GraphQLObjectType):
            return (OBJECT, non_null, type_.name, self.fields(type_, field_nodes))
        if isinstance(type_, GraphQLInterfaceType | GraphQLUnionType):
            by_type = {
                member.name: self.fields(member, field_nodes)
                for member in self.schema.get_possible_types(type_)
            }
            return (ABSTRACT, non_null, by_type)
        # A leaf: the built-in scalars as graphql-core serialises them, with a fast path for a
        # value already of the serialised type; enums checked against their names; any other
        # scalar (Decimal, JSON, ...) passed through, as build_schema's scalars serialise.
        if type_ is GraphQLInt:
            return (LEAF, non_null, None, int_coerce(type_.serialize))
        if type_ is GraphQLFloat:
            return (LEAF, non_null, None, float_coerce(type_.serialize))
        if type_ is GraphQLString or type_ is GraphQLID:
            return (LEAF, non_null, str, safe(type_.serialize))
        if type_ is GraphQLBoolean:
            return (LEAF, non_null, bool, safe(type_.serialize))
        if isinstance(type_, GraphQLEnumType):
            return (LEAF, non_null, None, enum_coerce(frozenset(type_.values), type_.serialize))
        return (LEAF, non_null, None, None)

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
                out.append((key, name, None, None, "", TYPENAME))
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
        return (OBJECT, False, root_type.name, self.plan_fields(root_type, collected))
