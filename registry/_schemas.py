"""JSON Schemas of extension points: checked once when an EP is defined, compiled once per worker."""

from __future__ import annotations

from typing import Any

import jsonschema

from config.errors import ConfigurationError


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
    """Build a reusable validator once, so each run pays only for validation itself."""
    if schema is None:
        return None
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)
