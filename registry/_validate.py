"""Deploy-time checks of a module: size, validity, import allowlist and entry export.

The checks of imports, entry and memory take a compiled module or the :class:`Structure` read
from its bytes (``registry/_structure.py``): a deploy runs them on the structure before anything
compiles, and again on what wasmtime compiled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, cast

import wasmtime

from scriptpool.config.errors import ForbiddenImport, InvalidModule, ModuleTooLarge
from scriptpool.engine import WASI_MODULE, Resolution, check_memory_io_provider, provided_signatures, resolve

_WASI = provided_signatures()


class _Export(Protocol):
    @property
    def name(self) -> str | None: ...
    @property
    def type(self) -> object: ...


class _Import(_Export, Protocol):
    @property
    def module(self) -> str: ...


class ModuleShape(Protocol):
    """What the checks read of a module: its imports and exports with their wasmtime types. A
    ``wasmtime.Module`` is one, and so is a :class:`scriptpool.registry._structure.Structure`."""

    @property
    def imports(self) -> Sequence[_Import]: ...
    @property
    def exports(self) -> Sequence[_Export]: ...


def _as_module(module: ModuleShape) -> wasmtime.Module:
    """``module`` for the engine's linking rules, which read only its imports and exports."""
    return cast("wasmtime.Module", module)


def check_size(wasm: bytes, limit: int, what: str = "module") -> None:
    """Fail with :class:`ModuleTooLarge` when ``wasm`` exceeds ``limit`` bytes."""
    if len(wasm) > limit:
        raise ModuleTooLarge(
            f"{what} is {len(wasm)} bytes; the limit is {limit}", size=len(wasm), limit=limit
        )
    if not wasm.startswith(b"\0asm"):
        raise InvalidModule(f"{what} is not a WebAssembly binary (bad magic number)")


def _signature(ty: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results)


def check_imports(module: ModuleShape, providers: Mapping[str, wasmtime.Module]) -> Resolution:
    """Check every import is ours or an installed provider's, and that the module links the way
    its ABI says (memory I/O, the Wasm API); return how it links."""
    for imp in module.imports:
        if imp.module != WASI_MODULE:
            continue
        where = f"{imp.module}.{imp.name}"
        wanted = _WASI.get(imp.name or "")
        if wanted is None:
            raise ForbiddenImport(f"import {where} is not provided by the sandbox", name=where)
        if not isinstance(imp.type, wasmtime.FuncType) or _signature(imp.type) != wanted:
            raise ForbiddenImport(f"import {where} has the wrong type", name=where)
    return resolve(_as_module(module), providers)


def check_provider_shape(name: str, module: ModuleShape) -> None:
    """A memory-I/O provider's imports and exports (``scriptpool.engine.check_memory_io_provider``)."""
    check_memory_io_provider(name, _as_module(module))


# WASI calls that pass buffers: they read and write the caller's exported memory.
_NEEDS_MEMORY = frozenset({"fd_write", "fd_read", "fd_fdstat_get", "random_get", "clock_time_get"})


def check_memory_export(module: ModuleShape) -> None:
    """Refuse a module that passes buffers to WASI but exports no memory named ``memory``: every
    such call would trap at run time."""
    calls = sorted({i.name for i in module.imports if i.module == WASI_MODULE and i.name in _NEEDS_MEMORY})
    if not calls:
        return
    exported = any(e.name == "memory" and isinstance(e.type, wasmtime.MemoryType) for e in module.exports)
    if not exported:
        raise InvalidModule(
            f"module imports {', '.join(calls)} but exports no memory named 'memory' for them to use",
            imports=calls,
        )


def check_entry(module: ModuleShape, export: str) -> None:
    """Fail unless ``export`` is a function taking and returning nothing (like ``_start``)."""
    for exp in module.exports:
        if exp.name == export:
            ty = exp.type
            if isinstance(ty, wasmtime.FuncType) and not ty.params and not ty.results:
                return
            raise InvalidModule(f"export {export!r} is not a function of type () -> ()")
    raise InvalidModule(f"module has no export {export!r}")
