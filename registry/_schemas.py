"""JSON Schemas of extension points: checked once when an EP is defined, compiled once per worker."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

import jsonschema

from scriptpool.config.errors import ConfigurationError


def check_schema(schema: dict[str, Any] | None, what: str) -> None:
    """Fail clearly if ``schema`` is not a valid JSON Schema."""
    if schema is None:
        return
    if not isinstance(schema, dict):
        raise ConfigurationError(f"{what} must be a JSON object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigurationError(f"{what} is not a valid JSON Schema: {exc.message}") from None


def compile_validator(schema: dict[str, Any] | None) -> jsonschema.protocols.Validator | None:
    """Build a reusable validator once, so each run pays only for validation itself.

    ``uniqueItems`` is ours: jsonschema compares every pair of items that do not sort (objects,
    say), so 2,000 small objects in a script's 20 KB output held a worker for 10 s. Ours hashes
    each item once, by JSON Schema's equality (``1`` equals ``1.0``, ``true`` does not equal
    ``1``, objects equal whatever their key order).
    """
    if schema is None:
        return None
    cls = jsonschema.validators.validator_for(schema)
    return jsonschema.validators.extend(cls, {"uniqueItems": _unique_items})(schema)


def _unique_items(
    validator: Any, unique: bool, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Hashable] = set()
    try:
        for item in instance:
            key = _equality_key(item)
            if key in seen:
                yield jsonschema.ValidationError(f"{_shown(instance)} has non-unique elements")
                return
            seen.add(key)
    except RecursionError:
        yield jsonschema.ValidationError("items are nested too deeply to compare")


def _equality_key(value: Any) -> Hashable:
    """A key equal for two JSON values exactly when JSON Schema calls them equal."""
    kind = type(value)
    if kind is bool:
        return ("bool", value)
    if kind is int or kind is float:
        return ("number", value)  # 1 == 1.0, and they hash alike
    if kind is str:
        return ("string", value)
    if value is None:
        return None
    if kind is list:
        return ("array", tuple(_equality_key(item) for item in value))
    if kind is dict:
        return ("object", frozenset((key, _equality_key(item)) for key, item in value.items()))
    return ("other", repr(value))


def _shown(instance: list[Any]) -> str:
    text = repr(instance)
    return text if len(text) <= 200 else text[:197] + "..."
