"""Extension points: per-EP limit overrides, JSON Schemas and the input sampling rate."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from config import Limits
from config.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class ExtensionPoint:
    """A place in checkout that scripts customise, e.g. ``discount``."""

    name: str
    limit_overrides: dict[str, int] = field(default_factory=dict)
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    input_validation_rate: float | None = None

    def limits(self, defaults: Limits) -> Limits:
        """The limits scripts at this EP run under."""
        return defaults.with_overrides(self.limit_overrides)

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "limit_overrides": self.limit_overrides,
                "input_schema": self.input_schema,
                "output_schema": self.output_schema,
                "input_validation_rate": self.input_validation_rate,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ExtensionPoint:
        data = json.loads(raw)
        return cls(
            name=data["name"],
            limit_overrides=data.get("limit_overrides") or {},
            input_schema=data.get("input_schema"),
            output_schema=data.get("output_schema"),
            input_validation_rate=data.get("input_validation_rate"),
        )


def check_schema(schema: dict[str, Any] | None, what: str) -> None:
    """Fail clearly if ``schema`` is not a valid JSON Schema."""
    if schema is None:
        return
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
