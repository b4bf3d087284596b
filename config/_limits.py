"""Per-execution resource limits; defaults follow Shopify Functions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from config.errors import ConfigurationError, InputTooLarge


@dataclass(frozen=True, slots=True)
class Limits:
    """The hard limits one execution runs under; an extension point may override any field."""

    fuel: int = 11_000_000
    memory_bytes: int = 10_000 * 1024
    stack_bytes: int = 512 * 1024
    input_bytes: int = 128 * 1024
    output_bytes: int = 20 * 1024
    log_bytes: int = 1024
    module_bytes: int = 256 * 1024
    # 11M fuel of a tight loop takes ~18 ms here; 100 ms leaves room for host calls and noise.
    wall_ms: int = 100

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigurationError(
                    f"limit {field.name} must be a positive integer, got {value!r}", limit=field.name
                )

    def with_overrides(self, overrides: dict[str, Any] | None) -> Limits:
        """Return these limits with ``overrides`` applied; unknown names are an error."""
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigurationError(
                f"limit overrides must be an object of names to integers, got {overrides!r}"
            )
        if not overrides:
            return self
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown limit(s): {', '.join(unknown)}; the limits are {', '.join(sorted(known))}",
                unknown=unknown,
            )
        return dataclasses.replace(self, **overrides)

    def as_dict(self) -> dict[str, int]:
        """Return the limits as a plain dict (for JSON and reports)."""
        return dataclasses.asdict(self)


def check_input_size(payload: bytes, limits: Limits) -> None:
    """Raise :class:`InputTooLarge` when serialised input exceeds ``limits.input_bytes``."""
    if len(payload) > limits.input_bytes:
        raise InputTooLarge(
            f"input is {len(payload)} bytes; the limit is {limits.input_bytes}",
            size=len(payload),
            limit=limits.input_bytes,
        )
