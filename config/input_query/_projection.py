"""The compiled plan of an input query and its walk: :class:`Projection` gives the query's
result over a host value (loaders called at most once per call), without graphql-core.

Long on purpose (past 450 lines): the walk is one recursive set of functions over one plan
layout (objects, lists, abstract types, leaves, loaders, the value budget) on the hot path of
every call to an EP with a schema; split, its pieces would call across modules per value."""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scriptpool.config.errors import InputTooLarge, InvalidArgument

__all__ = [
    "ABSTRACT",
    "LEAF",
    "LIST",
    "MAX_PROJECTED_VALUES",
    "OBJECT",
    "TYPENAME",
    "Field",
    "Projection",
    "enum_coerce",
    "float_coerce",
    "int_coerce",
    "plan_size",
    "safe",
]

# A plan is plain tuples, walked by _complete/_object below without graphql-core:
#   leaf:     (LEAF, non_null, fast_type | None, coerce | None)
#   list:     (LIST, non_null, item_node, plan_size(item_node))
#   object:   (OBJECT, non_null, type_name, fields)
#   abstract: (ABSTRACT, non_null, {concrete type name: fields})
# and a field is (response_key, field_name, canonical_key | None, arguments | None,
# argument_key, node); node is TYPENAME for ``__typename``.

LEAF, LIST, OBJECT, ABSTRACT = 0, 1, 2, 3
TYPENAME: tuple[Any, ...] = (4, False)
_MISSING = object()
_INVALID = object()
# Types a host value of which is never a loader: skips callable() on the hot path.
_PLAIN = frozenset({dict, list, tuple, str, int, float, bool})

Field = tuple[str, str, "str | None", "dict[str, Any] | None", str, tuple[Any, ...]]

#: The most values (each field's value, list element and ``__typename``, nulls included) one
#: projection may build; past it the call fails with ``input_too_large`` before the values are
#: built. The compile-time caps bound a plan (MAX_SELECTIONS fields) but not what it builds:
#: each list multiplies its item's plan by its length, so a 771-byte input once projected into
#: 166 MB. Fixed rather than derived from the input's size because the client projects a host
#: value whose size is unknown until it is encoded (loaders included); 100,000 because each
#: value encodes to 2 bytes at the very least and about 12 in practice (the 200-line benchmark
#: cart: 19.5 kB for some 1,600 values), so a projection this large is about 1.2 MB, around
#: the largest input the default limits accept once scaled (128 KiB times 10), and one past it
#: would be refused as too large anyway. ``max_values=`` on :meth:`Projection.project` sets
#: another for an EP whose input limit is raised further. Charged per list (its length times
#: its item's plan size, before its elements are built) and once for the root, so the count
#: costs one multiplication per list on the hot path, not one per value.
MAX_PROJECTED_VALUES = 100_000


class _Null(Exception):
    """A null met a non-null type: the nearest nullable parent becomes null (GraphQL's rule)."""


_NULL = _Null()


def safe(serialize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Return a leaf coercion by ``serialize`` that gives an invalid marker, not an exception."""

    def coerce(value: Any) -> Any:
        try:
            return serialize(value)
        except Exception:
            # A value the scalar cannot represent: GraphQL makes the field null (with an error
            # the script never sees).
            return _INVALID

    return coerce


def int_coerce(serialize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Return ``Int``'s coercion, with a fast path for a 32-bit ``int``."""
    slow = safe(serialize)

    def coerce(value: Any) -> Any:
        if type(value) is int and -2_147_483_648 <= value <= 2_147_483_647:
            return value
        return slow(value)

    return coerce


def float_coerce(serialize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Return ``Float``'s coercion, with a fast path for a finite ``float``."""
    slow = safe(serialize)

    def coerce(value: Any) -> Any:
        if type(value) is float and math.isfinite(value):
            return value
        return slow(value)

    return coerce


def enum_coerce(names: frozenset[str], serialize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Return an enum's coercion, with a fast path for one of its value names."""
    slow = safe(serialize)

    def coerce(value: Any) -> Any:
        if type(value) is str and value in names:
            return value
        return slow(value)

    return coerce


def _call(
    loader: Any,
    args: dict[str, Any] | None,
    arg_key: str,
    memo: dict[Any, Any],
    name: str,
    what: str = "field",
) -> Any:
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
            f"the loader for input {what} {name!r} returned an awaitable: use run_async "
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


def _loaded(value: Any, memo: dict[Any, Any], name: str) -> Any:
    """A loader met where a value appears outside a field (a list's element, the root):
    called, memoised per call like a field's."""
    return _call(value, None, "", memo, name, "value")


def _charge(node: tuple[Any, ...], value: Any, left: list[int]) -> Any:
    """Charge a list's values to the call's budget before they are built (its length times its
    item's plan size); return it as a list or tuple. Any other iterable is read only as far as
    the budget allows, so that an endless one is refused too."""
    size = node[3]
    if type(value) is not list and type(value) is not tuple:
        value = list(itertools.islice(value, left[0] // size + 1))
    left[0] -= len(value) * size
    if left[0] < 0:
        raise InputTooLarge(
            f"the input query's result over this input has more than {left[1]:,} values: refused "
            "before they are built (each list multiplies what the query selects in it)",
            limit=left[1],
        )
    return value


def _object(
    fields: tuple[Field, ...], type_name: str, src: Any, memo: dict[Any, Any], left: list[int]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mapping = type(src) is dict or isinstance(src, Mapping)
    if not mapping and callable(src):
        # A loader for the whole object (a list's element, the root): read by attribute, it
        # would give nulls.
        src = _loaded(src, memo, type_name)
        if src is None:
            raise _NULL  # the caller nulls this object, or its parent if it is non-null
        mapping = type(src) is dict or isinstance(src, Mapping)
    for key, name, alt, args, arg_key, node in fields:
        if node is TYPENAME:
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
        if kind == LEAF:
            fast = node[2]
            out[key] = value if fast is not None and type(value) is fast else _leaf(node, value)
        elif kind == OBJECT:
            # _complete inlined for the commonest nodes: a call less per field on the hot path.
            try:
                out[key] = _object(node[3], node[2], value, memo, left)
            except _Null:
                if node[1]:
                    raise
                out[key] = None
        else:
            out[key] = _complete(node, value, memo, left)
    return out


def _not_a_list(value: Any) -> bool:
    return isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable)


def _object_list(
    item: tuple[Any, ...], values: Iterable[Any], memo: dict[Any, Any], left: list[int]
) -> list[Any]:
    fields, type_name, non_null = item[3], item[2], item[1]
    out: list[Any] = []
    for value in values:
        if value is None:
            if non_null:
                raise _NULL
            out.append(None)
            continue
        try:
            out.append(_object(fields, type_name, value, memo, left))
        except _Null:
            if non_null:
                raise
            out.append(None)
    return out


def _complete(node: tuple[Any, ...], value: Any, memo: dict[Any, Any], left: list[int]) -> Any:
    if value is None:
        if node[1]:
            raise _NULL
        return None
    kind = node[0]
    if kind == LEAF:
        # Reached for a list's elements only (_object completes its own leaves): one may be a
        # loader.
        if type(value) not in _PLAIN and callable(value):
            value = _loaded(value, memo, "list element")
            if value is None:
                if node[1]:
                    raise _NULL
                return None
        return _leaf(node, value)
    try:
        if kind == OBJECT:
            return _object(node[3], node[2], value, memo, left)
        if kind == LIST:
            if type(value) is not list and type(value) is not tuple:
                if callable(value) and not isinstance(value, Mapping):
                    value = _loaded(value, memo, "list element")  # one that is a list
                    if value is None:
                        raise _NULL
                if type(value) is not list and type(value) is not tuple and _not_a_list(value):
                    raise _NULL  # GraphQL: "Expected Iterable": the list is null
            value = _charge(node, value, left)
            item = node[2]
            if item[0] == LEAF and item[2] is not None:
                fast = item[2]
                return [v if type(v) is fast else _complete(item, v, memo, left) for v in value]
            if item[0] == OBJECT:
                return _object_list(item, value, memo, left)
            return [_complete(item, v, memo, left) for v in value]
        type_name: Any
        if type(value) is dict:
            type_name = value.get("__typename")
        else:
            if callable(value) and not isinstance(value, Mapping):
                value = _loaded(value, memo, "list element")
                if value is None:
                    raise _NULL
            type_name = _typename(value)
        fields = node[2].get(type_name) if type(type_name) is str else None
        if fields is None:
            raise _NULL  # GraphQL: an abstract type's value must name a possible type
        return _object(fields, type_name, value, memo, left)
    except _Null:
        if node[1]:
            raise
        return None


async def _object_async(
    fields: tuple[Field, ...], type_name: str, src: Any, memo: dict[Any, Any], left: list[int]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, name, alt, args, arg_key, node in fields:
        if node is TYPENAME:
            out[key] = type_name
            continue
        value = _read(src, name, alt)
        if value is not None and type(value) not in _PLAIN and callable(value):
            value = await _call_async(value, args, arg_key, memo)
        out[key] = await _complete_async(node, value, memo, left)
    return out


async def _complete_async(node: tuple[Any, ...], value: Any, memo: dict[Any, Any], left: list[int]) -> Any:
    if value is not None and type(value) not in _PLAIN and callable(value) and not isinstance(value, Mapping):
        # A loader where a value appears outside a field (a list's element, the root), or one
        # a field's loader returned: called (its awaitable awaited) once per call.
        value = await _call_async(value, None, "", memo)
    if value is None:
        if node[1]:
            raise _NULL
        return None
    kind = node[0]
    if kind == LEAF:
        return _leaf(node, value)
    try:
        if kind == OBJECT:
            return await _object_async(node[3], node[2], value, memo, left)
        if kind == LIST:
            if type(value) is not list and type(value) is not tuple and _not_a_list(value):
                raise _NULL  # GraphQL: "Expected Iterable": the list is null
            value = _charge(node, value, left)
            return [await _complete_async(node[2], v, memo, left) for v in value]
        type_name = _typename(value)
        fields = node[2].get(type_name) if type(type_name) is str else None
        if fields is None:
            raise _NULL
        return await _object_async(fields, type_name, value, memo, left)
    except _Null:
        if node[1]:
            raise
        return None


def plan_size(node: tuple[Any, ...]) -> int:
    """Return how many values one instance of the plan ``node`` builds at most, its lists'
    elements aside (each list charges its own when it is projected): 1 for a leaf, a
    ``__typename`` or a list, and an object's own 1 plus its fields' (an abstract type's
    largest member's)."""
    kind = node[0]
    if kind == OBJECT:
        return 1 + sum(plan_size(f[5]) for f in node[3])
    if kind == ABSTRACT:
        return 1 + max((sum(plan_size(f[5]) for f in fields) for fields in node[2].values()), default=0)
    return 1


@dataclass(frozen=True, eq=False)
class Projection:
    """A compiled input query (or, from :func:`merge`, the union of several): apply it with
    :meth:`project` or :meth:`project_async`. Plain tuples; building one needs graphql-core,
    using one does not."""

    root: tuple[Any, ...]
    #: True for a plan from :func:`merge`: its result is the union form each app's plan reads.
    merged: bool = False
    #: What the root's own values count against the budget (:func:`plan_size`).
    size: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", plan_size(self.root))

    def project(
        self, value: Any, *, memo: dict[Any, Any] | None = None, max_values: int = MAX_PROJECTED_VALUES
    ) -> Any:
        """Return the query's result over the host value ``value`` (``None`` if a null reached
        the root through non-null fields, as GraphQL's ``data`` would be). Loaders are called
        at most once per ``memo`` (a fresh one per call unless given); one that returns an
        awaitable is refused (``invalid_argument``): use :meth:`project_async`. A result of
        more than ``max_values`` values (:data:`MAX_PROJECTED_VALUES`) is refused with
        ``input_too_large`` before it is built."""
        return _complete(self.root, value, {} if memo is None else memo, self._budget(max_values))

    async def project_async(
        self, value: Any, *, memo: dict[Any, Any] | None = None, max_values: int = MAX_PROJECTED_VALUES
    ) -> Any:
        """Like :meth:`project`, awaiting what a loader returns if it is awaitable (a loader
        shared by two branches is called once and its result awaited once)."""
        budget = self._budget(max_values)
        return await _complete_async(self.root, value, {} if memo is None else memo, budget)

    def _budget(self, max_values: int) -> list[int]:
        # [values left, the budget]: one list per call, charged by each list it projects.
        left = max_values - self.size
        if left < 0:
            raise InputTooLarge(
                f"the input query's result has more than {max_values:,} values", limit=max_values
            )
        return [left, max_values]

    def selection(self) -> dict[str, Any]:
        """Return what the plan selects, as nested dicts: a response key (a canonical key in
        a merged plan) maps to None for a leaf or to its own selection; the fields that an
        abstract type's members select sit under ``"... on Type"``."""
        return _describe(self.root) or {}


def _describe(node: tuple[Any, ...]) -> dict[str, Any] | None:
    kind = node[0]
    if kind == LIST:
        return _describe(node[2])
    if kind == OBJECT:
        return {f[0]: (None if f[5] is TYPENAME else _describe(f[5])) for f in node[3]}
    if kind == ABSTRACT:
        return {
            f"... on {type_name}": {f[0]: (None if f[5] is TYPENAME else _describe(f[5])) for f in fields}
            for type_name, fields in node[2].items()
        }
    return None
