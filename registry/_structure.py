"""What a module is made of, as read from its bytes before anything compiles it: its imports and
exports with their types, and its measures (section and item counts; for every function its
locals, body size, control-flow nesting, loops and branches).

Each measure is held to a cap (:class:`Caps`) far above what real modules measure, so that a
module built to make the compiler work for minutes (78,000 nested loops in 234 KB, say) is
refused in milliseconds with :class:`ModuleTooComplex`, before a compiler ever sees it. Whatever
stays under the caps still compiles in a child process bounded in time and memory
(``registry/_bounded_compile.py``): the caps are the cheap first line, not the only one.

:func:`read_structure` (``registry/_structure_reader.py``) reads a module into a
:class:`Structure`, in one bounded pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import wasmtime

FUNC_KIND, TABLE_KIND, MEMORY_KIND, GLOBAL_KIND, TAG_KIND = range(5)
_KIND_NAMES = ("func", "table", "memory", "global", "tag")


@dataclass(frozen=True, slots=True)
class Caps:
    """The most of each thing a module may hold. The defaults (:data:`CAPS`) are far above
    what real modules measure (README, "Module structure and compile bounds"): they refuse what
    only a module made to exhaust the compiler has."""

    sections: int = 1_000  # custom sections included
    types: int = 20_000
    type_arity: int = 1_000  # parameters or results of a function type, fields of a struct
    imports: int = 1_000
    functions: int = 50_000  # defined in the module (imported ones count as imports)
    tables: int = 100
    memories: int = 100
    globals: int = 50_000
    exports: int = 50_000
    elements: int = 50_000  # element segments
    data: int = 50_000  # data segments
    tags: int = 10_000
    locals: int = 10_000  # per function, declared (parameters not included)
    body_bytes: int = 1 << 20  # per function
    nesting: int = 2_000  # control frames open at once in a function (block, loop, if, try_table)
    loops: int = 1_000  # loops in one function
    branches: int = 20_000  # br, br_if, br_table, if, br_on_* in one function
    branch_targets: int = 50_000  # labels of one br_table


CAPS = Caps()


@dataclass(frozen=True, slots=True)
class FuncSig:
    """A function type: its parameter and result types as wasmtime spells them (``i32``, ...;
    a reference type other than ``funcref`` and ``externref`` as ``ref``)."""

    params: tuple[str, ...]
    results: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of a memory or table."""

    minimum: int
    maximum: int | None
    is_64: bool = False


@dataclass(frozen=True, slots=True)
class Import:
    """One import: its names, kind, and type (a :class:`FuncSig` for a function with a function
    type, :class:`Limits` for a memory or table, the value type for a global, else None)."""

    module: str
    name: str
    kind: int
    desc: FuncSig | Limits | str | None

    @property
    def type(self) -> Any:
        """The import's type as wasmtime describes it, so the deploy's import checks
        (``registry/_validate.py``, ``engine/_link.py``) run on it as on a compiled module."""
        return _wasmtime_type(self.kind, self.desc)


@dataclass(frozen=True, slots=True)
class Export:
    """One export: its name, kind, and type as for :class:`Import`."""

    name: str
    kind: int
    desc: FuncSig | Limits | str | None

    @property
    def type(self) -> Any:
        """The export's type as wasmtime describes it (see :attr:`Import.type`)."""
        return _wasmtime_type(self.kind, self.desc)


@dataclass(frozen=True, slots=True)
class Structure:
    """What a module is made of: its imports and exports, and the measures the caps hold."""

    size: int
    imports: tuple[Import, ...]
    exports: tuple[Export, ...]
    sections: int
    types: int
    functions: int
    globals: int
    data: int
    elements: int
    max_locals: int
    max_body_bytes: int
    max_nesting: int
    max_loops: int
    max_branches: int
    max_branch_targets: int
    instructions: int

    def measures(self) -> dict[str, int]:
        """The measures the caps hold, by cap name (for reports and the README's figures)."""
        return {
            "bytes": self.size,
            "sections": self.sections,
            "types": self.types,
            "imports": len(self.imports),
            "functions": self.functions,
            "globals": self.globals,
            "exports": len(self.exports),
            "data": self.data,
            "elements": self.elements,
            "locals": self.max_locals,
            "body_bytes": self.max_body_bytes,
            "nesting": self.max_nesting,
            "loops": self.max_loops,
            "branches": self.max_branches,
            "branch_targets": self.max_branch_targets,
            "instructions": self.instructions,
        }


def _wasmtime_type(kind: int, desc: FuncSig | Limits | str | None) -> Any:
    """wasmtime's type for an import or export read here; None where wasmtime-py has none
    (a tag, a GC reference type): nothing the sandbox provides has such a type."""
    if kind == FUNC_KIND and isinstance(desc, FuncSig):
        params = [_VALTYPES.get(p) for p in desc.params]
        results = [_VALTYPES.get(r) for r in desc.results]
        if any(t is None for t in (*params, *results)):
            return None
        return wasmtime.FuncType([t() for t in params if t], [t() for t in results if t])
    if kind == MEMORY_KIND and isinstance(desc, Limits):
        return wasmtime.MemoryType(wasmtime.Limits(desc.minimum, desc.maximum), is_64=desc.is_64)
    if kind == TABLE_KIND and isinstance(desc, Limits):
        return wasmtime.TableType(wasmtime.ValType.funcref(), wasmtime.Limits(desc.minimum, desc.maximum))
    if kind == GLOBAL_KIND and isinstance(desc, str) and desc in _VALTYPES:
        return wasmtime.GlobalType(_VALTYPES[desc](), False)
    return None


_VALTYPES: dict[str, Callable[[], wasmtime.ValType]] = {
    "i32": wasmtime.ValType.i32,
    "i64": wasmtime.ValType.i64,
    "f32": wasmtime.ValType.f32,
    "f64": wasmtime.ValType.f64,
    "funcref": wasmtime.ValType.funcref,
    "externref": wasmtime.ValType.externref,
}


def kind_name(kind: int) -> str:
    """``func``, ``table``, ``memory``, ``global`` or ``tag``."""
    return _KIND_NAMES[kind]
