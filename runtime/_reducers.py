"""How a join combines the outputs of its apps' scripts (``concat:PATH``, ``first``,
``max:PATH``, ``min:PATH``; ``wasm`` is run by ``scriptpool.runtime._combine``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scriptpool.config.errors import InvalidOutput


@dataclass(frozen=True, slots=True)
class Reducer:
    """How a join combines its outputs; see the module docstring."""

    kind: str  # "concat", "first", "max", "min" or "wasm"
    path: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Reducer:
        kind, _, path = spec.partition(":")
        return cls(kind, tuple(path.split(".")) if path else ())

    def check(self, output: Any) -> None:
        """Raise :class:`InvalidOutput` if this reducer cannot use ``output``."""
        if self.kind in ("concat", "max", "min"):
            value = self._at(output)
            if self.kind == "concat" and not isinstance(value, (list, type(None))):
                raise InvalidOutput(f"output has no list at {'.'.join(self.path)} to concatenate")
            if self.kind != "concat" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise InvalidOutput(f"output has no number at {'.'.join(self.path)} to compare")

    def combine(self, outputs: list[Any]) -> Any:
        """The combined output of ``outputs`` (checked, non-empty, in app order)."""
        if self.kind == "first":
            return outputs[0]
        if self.kind == "max":
            return max(outputs, key=self._at)  # max() keeps the first of equals
        if self.kind == "min":
            return min(outputs, key=self._at)
        joined: list[Any] = []
        for output in outputs:
            joined.extend(self._at(output) or ())
        return _with(outputs[0], self.path, joined)

    def _at(self, output: Any) -> Any:
        value = output
        for key in self.path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value


def _with(output: Any, path: tuple[str, ...], value: Any) -> Any:
    """A copy of ``output`` (an object) with ``value`` at ``path``, creating objects on the way."""
    if not path:
        return value
    base = dict(output) if isinstance(output, dict) else {}
    base[path[0]] = _with(base.get(path[0]), path[1:], value)
    return base
