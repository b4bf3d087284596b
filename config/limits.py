"""Per-execution resource limits; defaults follow Shopify Functions.

Public as ``scriptpool.config.limits`` for the ranges (:data:`LIMIT_RANGES`, :func:`limit_problem`),
which the engine checks its own configuration against; :class:`Limits` and
:func:`check_input_size` are also names of ``scriptpool.config``, since every side uses them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from scriptpool.config.errors import ConfigurationError, InputTooLarge

__all__ = ["LIMIT_RANGES", "Limits", "check_input_size", "limit_problem"]

_KIB, _MIB, _GIB = 1 << 10, 1 << 20, 1 << 30

# The range of each limit, both ends included; every limit is checked against it wherever it comes
# from: the environment's defaults, an EP's overrides (at ``ep define`` and again when a worker or
# a deploy reads the record from Redis, where anyone with write access could have put anything), a
# captured run, the engine. Each maximum is what the engine can honour, or a bound past every real
# use; each minimum is 1 where a smaller limit only fails the script by name.
LIMIT_RANGES: dict[str, tuple[int, int]] = {
    # wasmtime keeps fuel in a signed 64-bit counter; our ctypes call takes an unsigned one.
    "fuel": (1, 2**63 - 1),
    # One Wasm page at least (less and no script with a memory could start); wasm32 addresses
    # 4 GiB, which is also the size of a pooled memory slot (engine/_engine.py).
    "memory_bytes": (64 * _KIB, 4 * _GIB),
    # A guest runs on a fiber of wasmtime's async stack (2 MiB, set in engine/_engine.py) when it
    # is profiled; a Wasm stack past that aborted the process, and one equal to it overflowed the
    # fiber with our host frames (measured). 1 MiB leaves the host half of the fiber.
    "stack_bytes": (16 * _KIB, 1 * _MIB),
    "input_bytes": (1, 16 * _MIB),
    "output_bytes": (1, 16 * _MIB),
    "log_bytes": (1, 1 * _MIB),
    "module_bytes": (8, 64 * _MIB),  # 8: the Wasm header alone
    "wall_ms": (1, 60_000),
}
_RANGE_TEXT = {
    "fuel": "instructions, at most 2^63-1",
    "memory_bytes": "bytes, 64 KiB to 4 GiB",
    "stack_bytes": "bytes, 16 KiB to 1 MiB",
    "input_bytes": "bytes, up to 16 MiB",
    "output_bytes": "bytes, up to 16 MiB",
    "log_bytes": "bytes, up to 1 MiB",
    "module_bytes": "bytes, up to 64 MiB",
    "wall_ms": "ms, up to 60 s",
}
_RANGES = tuple(LIMIT_RANGES.items())


def limit_problem(name: str, value: object) -> str | None:
    """Why ``value`` cannot be limit ``name`` (its range, and what it got), or None if it can."""
    low, high = LIMIT_RANGES[name]
    if type(value) is int and low <= value <= high:  # not bool, not float, not a subclass
        return None
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"limit {name} must be a positive integer from {low} to {high} ({_RANGE_TEXT[name]}), got {shown}"


def clamp_limit(name: str, value: int) -> int:
    """``value`` brought into the range of limit ``name``."""
    low, high = LIMIT_RANGES[name]
    return min(max(value, low), high)


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
        for name, (low, high) in _RANGES:
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ConfigurationError(str(limit_problem(name, value)), limit=name, low=low, high=high)

    def with_overrides(self, overrides: dict[str, Any] | None) -> Limits:
        """Return these limits with ``overrides`` applied; unknown names are an error."""
        if overrides is not None and not isinstance(overrides, dict):
            shown = repr(overrides)
            raise ConfigurationError(
                f"limit overrides must be an object of names to integers, got {shown[:60]}"
            )
        if not overrides:
            return self
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            named = ", ".join(str(name)[:40] for name in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise ConfigurationError(
                f"unknown limit(s): {named}; the limits are {', '.join(sorted(known))}",
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
