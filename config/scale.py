"""Limits that grow with the input, as Shopify's ``@scaleLimits``: an extension point names JSON
paths of lists with a rate each, and a bigger cart gets a bigger budget.

The factor follows function-runner's scale-limits analyzer: for each path, every value at its
last key counts its length (a list's items, a string's UTF-8 bytes, anything else, a missing key
too, counts 1) times the rate; the counts of one path are summed (``cart.deliveryGroups.options``
sums the options of every delivery group, since lists along the path are walked through); the
factor is the largest sum over the paths, clamped to [1, 10]. It multiplies the instruction,
input and output limits, and nothing else (memory, stack, logs and the wall clock stay).

A scaled limit stops at the maximum of its range (``scriptpool.config.limits.LIMIT_RANGES``) rather than
failing the run: the base limit was checked when the EP was defined, and the factor comes from
the caller's input, which is no configuration mistake; the maximum is what the engine honours, so
a run at it is the most any configuration could give.

Public as ``scriptpool.config.scale`` for the rules (:func:`check_scale_rules`,
:func:`parse_scale_rule`, :data:`MAX_SCALE_FACTOR`), which only EP definitions handle;
:func:`scale_factor`, :func:`scaled_limits` and :func:`largest_input_bytes` are also names of
``scriptpool.config``, since both the client and the workers size a call with them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from scriptpool.config.errors import ConfigurationError
from scriptpool.config.limits import Limits, clamp_limit

__all__ = [
    "MAX_SCALE_FACTOR",
    "check_scale_rules",
    "largest_input_bytes",
    "parse_scale_rule",
    "scale_factor",
    "scaled_limits",
]

MIN_SCALE_FACTOR = 1.0
MAX_SCALE_FACTOR = 10.0
# More rules than this is a mistake (each one is a walk of the input on every call).
MAX_SCALE_RULES = 16
# The limits the factor multiplies.
SCALED_LIMITS = ("fuel", "input_bytes", "output_bytes")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,15}")


def check_scale_rules(rules: object) -> dict[str, float]:
    """The scale rules as ``{path: rate}``, or :class:`ConfigurationError` naming the bad one."""
    if rules is None:
        return {}
    if not isinstance(rules, Mapping):
        raise ConfigurationError(f"scale rules must be an object of paths to rates, got {rules!r}")
    if len(rules) > MAX_SCALE_RULES:
        raise ConfigurationError(f"at most {MAX_SCALE_RULES} scale rules, got {len(rules)}")
    checked: dict[str, float] = {}
    for path, rate in rules.items():
        if not isinstance(path, str) or not _PATH.fullmatch(path):
            raise ConfigurationError(
                f"scale path must be keys joined by dots, like cart.lines, got {path!r}", path=str(path)
            )
        if (
            not isinstance(rate, (int, float))
            or isinstance(rate, bool)
            or not math.isfinite(rate)
            or rate <= 0
        ):
            raise ConfigurationError(
                f"scale rate of {path} must be a positive number, like 0.005, got {rate!r}", path=path
            )
        checked[path] = float(rate)
    return checked


def parse_scale_rule(text: str) -> tuple[str, float]:
    """``cart.lines=0.005`` as (path, rate), as the command line takes it."""
    path, sep, rate = text.partition("=")
    try:
        value = float(rate) if sep else None
    except ValueError:
        value = None
    if value is None:
        raise ConfigurationError(f"a scale rule is PATH=RATE, like cart.lines=0.005, got {text!r}")
    ((path, value),) = check_scale_rules({path.strip(): value}).items()
    return path, value


def scale_factor(value: Any, rules: Mapping[str, float]) -> float:
    """How much bigger than the base limits the limits of a run on ``value`` are (1 to 10)."""
    factor = MIN_SCALE_FACTOR
    for path, rate in rules.items():
        keys = path.split(".")
        parents: list[Any] = [value]
        for key in keys[:-1]:
            parents = _children(parents, key)
        last = keys[-1]
        total = 0.0
        for parent in parents:
            child = parent.get(last) if isinstance(parent, dict) else None
            total += _length(child) * rate
        factor = max(factor, total)
    return min(max(factor, MIN_SCALE_FACTOR), MAX_SCALE_FACTOR)


def _children(parents: list[Any], key: str) -> list[Any]:
    """The values at ``key`` of each parent; a list's items are walked through, not counted."""
    found: list[Any] = []
    for parent in parents:
        if isinstance(parent, dict) and key in parent:
            child = parent[key]
            if isinstance(child, list):
                found.extend(child)
            elif child is not None:
                found.append(child)
    return found


def _length(value: Any) -> int:
    if isinstance(value, list):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    return 1


def scaled_limits(limits: Limits, factor: float) -> Limits:
    """``limits`` with the instruction, input and output limits multiplied by ``factor``."""
    if factor <= MIN_SCALE_FACTOR:
        return limits
    changes = {name: clamp_limit(name, int(getattr(limits, name) * factor)) for name in SCALED_LIMITS}
    return dataclasses.replace(limits, **changes)


def largest_input_bytes(limits: Limits) -> int:
    """The input size no scale factor allows past: inputs above it are refused unread."""
    return clamp_limit("input_bytes", int(limits.input_bytes * MAX_SCALE_FACTOR))
