"""Where each import of a provider-linked module comes from: the one set of linking rules, used at
deploy (to refuse what cannot link, with a reason) and by the sandbox (to link it, once per module).

An import is resolved to one of:

- our WASI subset (``wasi_snapshot_preview1``);
- an export of a provider instance, by name: what the module imports as it is, or for the
  numeric functions of the Wasm API (``shopify_function_*``), the provider's ``_``-prefixed export;
- an export of the glue module: the Wasm API's string functions, and the guest's own memory
  (which the deploy-time rewrite turned into an import of :data:`GUEST_MEMORY_MODULE`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import wasmtime

from scriptpool.config.errors import ForbiddenImport, InvalidModule
from scriptpool.engine._abi import (
    API_NUMERIC,
    API_STRING,
    GLUE_MEMORY_EXPORT,
    GUEST_MEMORY_MODULE,
    GUEST_MEMORY_NAME,
    PROVIDER_RAW,
    MemoryLimits,
    Signature,
    glue_needs,
    is_memory_io_provider,
    needs_glue,
    wasm_api_version,
)
from scriptpool.engine._wasi import MODULE as WASI_MODULE

WASI, PROVIDER, GLUE = 0, 1, 2

# The exports a memory-I/O provider must have, with their types.
MEMORY_IO_EXPORTS: dict[str, Signature] = {"initialize": (("i32",), ("i32",)), "finalize": ((), ("i32",))}


@dataclass(frozen=True, slots=True)
class Source:
    """Where one import comes from: ``kind`` (WASI, PROVIDER or GLUE), the provider's position in
    :attr:`Resolution.providers` (PROVIDER only) and the export's name there."""

    kind: int
    provider: int
    name: str


@dataclass(frozen=True, slots=True)
class Resolution:
    """How a module links: its providers in first-import order, the source of each import (in
    the module's import order), and what the glue must provide."""

    providers: tuple[str, ...]
    sources: tuple[Source, ...]
    memory_io: str | None  # the memory-I/O provider, if the module uses one
    imports_wasi: bool
    glue_provider: str | None  # the Wasm API provider the glue links to
    glue_version: int
    glue_functions: tuple[str, ...]  # string functions of the Wasm API, in import order
    # numeric functions imported under their guest-facing names: (name, provider export, type)
    glue_aliases: tuple[tuple[str, str, Signature], ...]
    guest_memory: MemoryLimits | None  # the rewritten guest memory import, if any


def signature(ty: wasmtime.FuncType) -> Signature:
    return tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results)


def _exports(module: wasmtime.Module) -> dict[str, object]:
    return {e.name: e.type for e in module.exports}


def check_memory_io_provider(name: str, module: wasmtime.Module) -> None:
    """Refuse a provider installed under a memory-I/O name that does not speak memory I/O."""
    if not is_memory_io_provider(name):
        return
    if module.imports:
        first = module.imports[0]
        raise InvalidModule(
            f"memory-I/O provider {name!r} must import nothing, but imports {first.module}.{first.name}"
        )
    exports = _exports(module)
    if not isinstance(exports.get("memory"), wasmtime.MemoryType):
        raise InvalidModule(f"memory-I/O provider {name!r} has no memory export named memory")
    for export, wanted in MEMORY_IO_EXPORTS.items():
        ty = exports.get(export)
        if not isinstance(ty, wasmtime.FuncType) or signature(ty) != wanted:
            raise InvalidModule(f"memory-I/O provider {name!r} must export {export} of type {_show(wanted)}")


def resolve(module: wasmtime.Module, providers: Mapping[str, wasmtime.Module]) -> Resolution:
    """Resolve every non-WASI import of ``module`` against the installed ``providers``.

    Raises :class:`ForbiddenImport` for an import nothing provides (or of the wrong type) and
    :class:`InvalidModule` for combinations that cannot run. WASI imports are resolved by name
    here; their types are the caller's to check.
    """
    names = list(dict.fromkeys(imp.module for imp in module.imports))
    imports_wasi = WASI_MODULE in names
    memory_io = [n for n in names if is_memory_io_provider(n)]
    if memory_io:
        if imports_wasi:
            raise ForbiddenImport(
                f"Invalid Function, cannot use `{memory_io[0]}` and import WASI. If using Rust, change "
                "the build target to `wasm32-unknown-unknown`.",
                name=memory_io[0],
            )
        others = [n for n in names if n not in (memory_io[0], GUEST_MEMORY_MODULE)]
        if others:
            raise ForbiddenImport(
                f"a module using the memory-I/O provider {memory_io[0]!r} imports nothing else, "
                f"but it imports {others[0]!r}",
                name=others[0],
            )
    order = [n for n in names if n not in (WASI_MODULE, GUEST_MEMORY_MODULE)]
    slot = {name: i for i, name in enumerate(order)}
    sources: list[Source] = []
    glue_functions: list[str] = []
    glue_aliases: dict[str, tuple[str, str, Signature]] = {}
    glue_provider: str | None = None
    glue_version = 0
    guest_memory: MemoryLimits | None = None
    for imp in module.imports:
        where = f"{imp.module}.{imp.name}"
        name = imp.name or ""
        if imp.module == WASI_MODULE:
            sources.append(Source(WASI, -1, name))
            continue
        if imp.module == GUEST_MEMORY_MODULE:
            if name != GUEST_MEMORY_NAME or not isinstance(imp.type, wasmtime.MemoryType):
                raise ForbiddenImport(f"import {where} is not provided by the sandbox", name=where)
            limits = imp.type.limits
            guest_memory = MemoryLimits(limits.min, limits.max)
            sources.append(Source(GLUE, -1, GLUE_MEMORY_EXPORT))
            continue
        provider = providers.get(imp.module)
        if provider is None:
            raise ForbiddenImport(
                f"import {where} names no WASI function and no installed provider", name=where
            )
        exports = _exports(provider)
        if needs_glue(imp.module, name):
            version = wasm_api_version(imp.module) or 0
            if glue_provider not in (None, imp.module):
                raise InvalidModule("a module may use the functions of one Wasm API provider only")
            _check_type(imp, API_STRING[name], f"the Wasm API's {name}")
            for raw in glue_needs(name, version):
                _check_export(imp.module, exports, raw, PROVIDER_RAW[raw])
            if not isinstance(exports.get("memory"), wasmtime.MemoryType):
                raise ForbiddenImport(f"provider {imp.module!r} does not export its memory", name=where)
            glue_provider = imp.module
            glue_version = version
            if name not in glue_functions:
                glue_functions.append(name)
            sources.append(Source(GLUE, -1, name))
            continue
        target = name
        if wasm_api_version(imp.module) is not None and name in API_NUMERIC and f"_{name}" in exports:
            target = f"_{name}"
        if target not in exports:
            raise ForbiddenImport(f"provider {imp.module!r} does not export {name!r}", name=where)
        ty = exports[target]
        if isinstance(imp.type, wasmtime.FuncType):
            if not isinstance(ty, wasmtime.FuncType) or signature(ty) != signature(imp.type):
                raise ForbiddenImport(
                    f"import {where} has the wrong type for the provider's {target}", name=where
                )
        elif type(ty) is not type(imp.type):
            raise ForbiddenImport(f"import {where} is not the kind of item {target} is", name=where)
        if target != name and isinstance(ty, wasmtime.FuncType):
            # Linked by name at run time: the glue re-exports the provider's function as `name`.
            if glue_provider not in (None, imp.module):
                raise InvalidModule("a module may use the functions of one Wasm API provider only")
            glue_provider = imp.module
            glue_version = wasm_api_version(imp.module) or 0
            glue_aliases.setdefault(name, (name, target, signature(ty)))
        sources.append(Source(PROVIDER, slot[imp.module], target))
    if glue_functions and guest_memory is None:
        raise InvalidModule("glue for the Wasm API's string functions needs the guest memory import")
    if guest_memory is not None and not glue_functions:
        where = f"{GUEST_MEMORY_MODULE}.{GUEST_MEMORY_NAME}"
        raise ForbiddenImport(f"import {where} is not provided by the sandbox", name=where)
    return Resolution(
        providers=tuple(order),
        sources=tuple(sources),
        memory_io=memory_io[0] if memory_io else None,
        imports_wasi=imports_wasi,
        glue_provider=glue_provider,
        glue_version=glue_version,
        glue_functions=tuple(glue_functions),
        glue_aliases=tuple(glue_aliases.values()),
        guest_memory=guest_memory,
    )


def _check_type(imp: wasmtime.ImportType, wanted: Signature, what: str) -> None:
    where = f"{imp.module}.{imp.name}"
    if not isinstance(imp.type, wasmtime.FuncType) or signature(imp.type) != wanted:
        raise ForbiddenImport(
            f"import {where} is not of type {_show(wanted)}, as {what} is (modules built for the "
            "context-based API must be trampolined)",
            name=where,
        )


def _check_export(provider: str, exports: dict[str, object], name: str, wanted: Signature) -> None:
    ty = exports.get(name)
    if not isinstance(ty, wasmtime.FuncType) or signature(ty) != wanted:
        raise ForbiddenImport(
            f"provider {provider!r} must export {name} of type {_show(wanted)} for the Wasm API glue",
            name=f"{provider}.{name}",
        )


def _show(sig: Signature) -> str:
    return f"({', '.join(sig[0])}) -> ({', '.join(sig[1])})"
