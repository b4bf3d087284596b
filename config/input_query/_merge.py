"""Projecting a host value through a query, and merging several apps' plans into the one that
loads their union, for joins and chains."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from scriptpool.config.errors import InvalidArgument
from scriptpool.config.input_query._projection import (
    ABSTRACT,
    LEAF,
    LIST,
    MAX_PROJECTED_VALUES,
    OBJECT,
    TYPENAME,
    Field,
    Projection,
    plan_size,
)
from scriptpool.config.input_query._query import InputQuery

__all__ = ["merge", "project", "project_async"]


def project(
    query: InputQuery | Projection,
    value: Any,
    *,
    variables: Mapping[str, Any] | None = None,
    memo: dict[Any, Any] | None = None,
    max_values: int = MAX_PROJECTED_VALUES,
) -> Any:
    """Return ``query``'s result over the host value ``value`` (see :meth:`Projection.project`)."""
    plan = query.plan(variables) if isinstance(query, InputQuery) else query
    return plan.project(value, memo=memo, max_values=max_values)


async def project_async(
    query: InputQuery | Projection,
    value: Any,
    *,
    variables: Mapping[str, Any] | None = None,
    memo: dict[Any, Any] | None = None,
    max_values: int = MAX_PROJECTED_VALUES,
) -> Any:
    """Like :func:`project`, awaiting loaders that return awaitables."""
    plan = query.plan(variables) if isinstance(query, InputQuery) else query
    return await plan.project_async(value, memo=memo, max_values=max_values)


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
    if kind == LEAF:
        return (LEAF, False, first[2], first[3])
    if kind == LIST:
        item = _merge_nodes([n[2] for n in nodes])
        return (LIST, False, item, plan_size(item))
    if kind == OBJECT:
        return (OBJECT, False, first[2], _merge_fields([n[3] for n in nodes], typename=False))
    members: dict[str, list[tuple[Field, ...]]] = {}
    for n in nodes:
        for type_name, fields in n[2].items():
            members.setdefault(type_name, []).append(fields)
    return (
        ABSTRACT,
        False,
        {type_name: _merge_fields(lists, typename=True) for type_name, lists in members.items()},
    )


def _merge_fields(lists: list[tuple[Field, ...]], *, typename: bool) -> tuple[Field, ...]:
    entries: dict[str, tuple[str, str | None, dict[str, Any] | None, str, list[tuple[Any, ...]]]] = {}
    for fields in lists:
        for _key, name, alt, args, arg_key, node in fields:
            if node is TYPENAME:
                continue
            canonical = alt or name
            entry = entries.get(canonical)
            if entry is None:
                entries[canonical] = (name, alt, args, arg_key, [node])
            else:
                entry[4].append(node)
    merged: list[Field] = []
    if typename:
        merged.append(("__typename", "__typename", None, None, "", TYPENAME))
    for canonical, (name, alt, args, arg_key, nodes) in entries.items():
        merged.append((canonical, name, alt, args, arg_key, _merge_nodes(nodes)))
    return tuple(merged)
