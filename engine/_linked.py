"""Provider-linked runs: a module that imports a provider (a JS runtime, a Shopify provider),
planned once per module, export and providers, and instantiated per run from a linker of its own.

The providers are instantiated first (outside the script's limits, with a memory-I/O provider's
``initialize``), then the Wasm API glue if it needs one, then the module; after the entry, a
memory-I/O provider's ``finalize`` gives the output and logs (``engine/_memory_io.py``). See
``engine/_abi.py`` for the ABIs and ``engine/_link.py`` for the linking rules. :class:`Sandbox`
(``engine/_run.py``) runs a module here when it is given providers; a plain run never comes here.
"""

from __future__ import annotations

import ctypes
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import wasmtime

from scriptpool.config import Limits
from scriptpool.config.errors import ExecutionError, InvalidModule
from scriptpool.engine._abi import GLUE_MEMORY_EXPORT, GUEST_MEMORY_MODULE, GUEST_MEMORY_NAME, glue_wat
from scriptpool.engine._call import (
    Prepared,
    RunThread,
    call_entry,
    check_call,
    describe,
    memory_bytes,
    memory_exports,
)
from scriptpool.engine._capi import (
    Instance,
    address_of,
    context_get_fuel,
    context_set_epoch_deadline,
    context_set_fuel,
    instance_export_get,
    instance_pre_instantiate,
    linker_allow_shadowing,
    linker_clone,
    linker_define,
    linker_define_instance,
    linker_delete,
    linker_get,
    linker_instantiate,
    linker_new,
    raise_error,
)
from scriptpool.engine._engine import EpochTicker
from scriptpool.engine._guest_io import GuestIO
from scriptpool.engine._link import WASI, resolve
from scriptpool.engine._memory_io import finalize, initialize
from scriptpool.engine._translate import Stage, out_of_memory, translate
from scriptpool.engine._wasi import MODULE as WASI_MODULE
from scriptpool.engine._wasi import GuestExit

# A provider's own work (instantiating it, and a memory-I/O provider's initialize and finalize)
# is not the script's: as in function-runner it runs with all the fuel there is and is not
# counted in the script's instructions. Time is what it costs the shard, so it is bounded by the
# script's own wall-clock limit: each of the two stages (instantiate and initialize; finalize)
# gets that limit afresh, and a provider-linked run ends within three times it.
_ALL_FUEL = (1 << 64) - 1

_INSTANCE_SIZE = ctypes.sizeof(Instance)
_WASI_NAME = WASI_MODULE.encode()
_NAME_GLUE_MEMORY = GLUE_MEMORY_EXPORT.encode()
_GUEST_MODULE = GUEST_MEMORY_MODULE.encode()
_GUEST_NAME = GUEST_MEMORY_NAME.encode()


@dataclass(frozen=True, slots=True)
class _Provider:
    """A provider a module links, prepared once: instantiated from the engine's linker (a
    provider imports only our WASI subset, or nothing)."""

    name: bytes  # the import-module name it is linked under
    module: wasmtime.Module
    pre: wasmtime.InstancePre
    pre_address: int
    memories: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class _Linked:
    """How a provider-linked module is instantiated, worked out once per module, export and
    providers. Each run gets a linker of its own: each provider is instantiated and defined
    under its name, then the glue (if any) beside the Wasm API provider it links, the module's
    WASI imports, and the module is instantiated from that linker, resolving every import by
    name in wasmtime. The modules are kept here, so their addresses stay valid."""

    entry: Prepared
    module: wasmtime.Module
    module_address: int
    providers: tuple[_Provider, ...]
    memory_io: int  # the memory-I/O provider's position in ``providers``, -1 if none
    glue: wasmtime.Module | None
    glue_address: int
    glue_name: bytes  # the provider the glue is defined beside
    guest_memory: bool  # the module imports its memory from the glue
    wasi: tuple[bytes, ...]  # the WASI functions the module imports

    @property
    def modules(self) -> tuple[wasmtime.Module, ...]:
        glue = (self.glue,) if self.glue is not None else ()
        return (self.module, *(p.module for p in self.providers), *glue)


# Glue modules differ only by the guest's memory limits and the functions it imports: few.
_GLUE_CACHE_ENTRIES = 256
# Measured: cloning the engine's linker takes 6.5 µs, defining one WASI import on a new one 1.5.
_WASI_DEFINITIONS_PER_CLONE = 4


class LinkedRuns:
    """The provider-linked runs of one :class:`Sandbox`, and what it keeps for them: per module,
    how it links (:class:`_Linked`); per provider, its ``InstancePre``; the glue modules.

    It shares the sandbox's engines, linkers, lock and epoch ticker (the dictionaries themselves,
    which the sandbox fills as it creates engines).
    """

    def __init__(
        self,
        ticker: EpochTicker,
        lock: threading.Lock,
        engines: dict[int, wasmtime.Engine],
        engine_addresses: dict[int, int],
        linkers: dict[int, wasmtime.Linker],
        linker_addresses: dict[int, int],
    ) -> None:
        self._ticker = ticker
        self._lock = lock
        self._engines = engines
        self._engine_addresses = engine_addresses
        self._linkers = linkers
        self._linker_addresses = linker_addresses
        # Per provider-linked module: (export, providers) -> _Linked; per provider: _Provider.
        self._linked: weakref.WeakKeyDictionary[wasmtime.Module, dict[tuple[Any, ...], _Linked]] = (
            weakref.WeakKeyDictionary()
        )
        self._providers: weakref.WeakKeyDictionary[wasmtime.Module, _Provider] = weakref.WeakKeyDictionary()
        # Glue modules, compiled once per engine and text (its guest memory limits vary).
        self._glue: dict[tuple[int, str], wasmtime.Module] = {}

    def run(
        self,
        t: RunThread,
        context: int,
        io: GuestIO,
        module: wasmtime.Module,
        limits: Limits,
        export: str,
        providers: Mapping[str, wasmtime.Module],
    ) -> tuple[ExecutionError | None, int, float, float, int]:
        """Instantiate the providers (and call a memory-I/O provider's initialize), the glue and
        the module, call the entry, then finalize: (error, peak memory bytes, instantiate
        seconds, run seconds, instructions). Only the glue, the module and the entry are metered.
        """
        error: ExecutionError | None = None
        instances = (Instance * (len(providers) + 1))()
        base = ctypes.addressof(instances)
        live: list[tuple[int, tuple[bytes, ...]]] = []  # (instance address, memory exports) for the peak
        instructions = 0
        metered = initialized = False
        started = time.perf_counter()
        instantiated = started
        plan: _Linked | None = None
        linker = 0
        try:
            t.io = io
            plan = self._prepare_linked(module, export, providers, limits.stack_bytes)
            # Cloning the engine's linker (all our WASI functions) costs about four definitions.
            if len(plan.wasi) > _WASI_DEFINITIONS_PER_CLONE:
                linker = linker_clone(self._linker_addresses[limits.stack_bytes])
            else:
                linker = linker_new(self._engine_addresses[limits.stack_bytes])
            linker_allow_shadowing(linker, True)  # the glue's names win over the provider's
            self._provider_budget(context, io, limits)
            for position, provider in enumerate(plan.providers):
                at = base + position * _INSTANCE_SIZE
                t.scratch.trap = None
                failure = instance_pre_instantiate(provider.pre_address, context, at, t.trap_at)
                _staged("instantiate", check_call, io, failure, t.scratch.trap)
                live.append((at, provider.memories))
                raise_error(linker_define_instance(linker, context, provider.name, len(provider.name), at))
            if plan.memory_io >= 0:
                _staged("initialize", initialize, t, context, io, base + plan.memory_io * _INSTANCE_SIZE)
                initialized = True
            self._meter(context, io, limits)
            metered = True
            if plan.glue is not None:
                self._link_glue(t, context, io, linker, plan, base + len(plan.providers) * _INSTANCE_SIZE)
                live.append((base + len(plan.providers) * _INSTANCE_SIZE, (_NAME_GLUE_MEMORY,)))
            if plan.wasi and len(plan.wasi) <= _WASI_DEFINITIONS_PER_CLONE:
                self._link_wasi(t, context, linker, plan.wasi, limits.stack_bytes)
            t.scratch.trap = None
            failure = linker_instantiate(linker, context, plan.module_address, t.instance_at, t.trap_at)
            check_call(io, failure, t.scratch.trap)
            live.append((t.instance_at, plan.entry.memories))
            instantiated = time.perf_counter()
            call_entry(t, context, plan.entry, export, io)
            io.check_deadline()
        except BaseException as exc:
            error = translate(exc, plan.modules if plan is not None else (module,), limits)
        finally:
            if linker:
                linker_delete(linker)
        if metered:
            context_get_fuel(context, t.fuel_at)
            instructions = limits.fuel - t.scratch.fuel
        if instantiated == started:
            instantiated = time.perf_counter()
        if initialized and plan is not None:
            # Also after a failed run: the logs written so far are in the provider's memory.
            self._provider_budget(context, io, limits)
            try:
                _staged("finalize", finalize, t, context, io, base + plan.memory_io * _INSTANCE_SIZE)
            except BaseException as exc:
                if error is None:
                    error = translate(exc, plan.modules, limits)
        finished = time.perf_counter()
        peak = max((memory_bytes(t, context, at, names) for at, names in live), default=0)
        error = out_of_memory(error, peak, limits)
        return error, peak, instantiated - started, finished - instantiated, instructions

    @staticmethod
    def _link_glue(t: RunThread, context: int, io: GuestIO, linker: int, plan: _Linked, at: int) -> None:
        """Instantiate the glue from the run's linker and define it beside its provider (and
        its guest memory as the module's memory import)."""
        t.scratch.trap = None
        failure = linker_instantiate(linker, context, plan.glue_address, at, t.trap_at)
        check_call(io, failure, t.scratch.trap)
        raise_error(linker_define_instance(linker, context, plan.glue_name, len(plan.glue_name), at))
        if plan.guest_memory:
            name = _NAME_GLUE_MEMORY
            if not instance_export_get(context, at, name, len(name), t.export_at):
                raise InvalidModule("glue has no guest memory")
            raise_error(
                linker_define(
                    linker,
                    context,
                    _GUEST_MODULE,
                    len(_GUEST_MODULE),
                    _GUEST_NAME,
                    len(_GUEST_NAME),
                    t.export_at,
                )
            )

    def _link_wasi(
        self, t: RunThread, context: int, linker: int, names: tuple[bytes, ...], stack_bytes: int
    ) -> None:
        """Define the module's WASI imports on the run's linker, from the engine's."""
        source = self._linker_addresses[stack_bytes]
        for name in names:
            if not linker_get(source, context, _WASI_NAME, len(_WASI_NAME), name, len(name), t.export_at):
                raise InvalidModule(f"import {WASI_MODULE}.{name.decode(errors='replace')} is not provided")
            defined = linker_define(
                linker, context, _WASI_NAME, len(_WASI_NAME), name, len(name), t.export_at
            )
            raise_error(defined)

    def _meter(self, context: int, io: GuestIO, limits: Limits) -> None:
        """From here on, the script's fuel and deadline apply (afresh), in guest code and host
        calls alike."""
        raise_error(context_set_fuel(context, limits.fuel))
        context_set_epoch_deadline(context, self._ticker.ticks_for(limits.wall_ms))
        io.start_clock(limits.wall_ms)

    def _provider_budget(self, context: int, io: GuestIO, limits: Limits) -> None:
        """A provider stage's own budget: all the fuel, and the script's wall-clock limit."""
        raise_error(context_set_fuel(context, _ALL_FUEL))
        context_set_epoch_deadline(context, self._ticker.ticks_for(limits.wall_ms))
        io.start_clock(limits.wall_ms)

    def _prepare_linked(
        self,
        module: wasmtime.Module,
        export: str,
        providers: Mapping[str, wasmtime.Module],
        stack_bytes: int,
    ) -> _Linked:
        """How ``module`` links to ``providers``, from the cache or worked out now."""
        key = (export, *map(id, providers.values()))
        per_module = self._linked.get(module)
        linked = per_module.get(key) if per_module is not None else None
        if linked is not None:
            return linked
        resolution = resolve(module, providers)
        position = {name: i for i, name in enumerate(resolution.providers)}
        prepared = tuple(self._provider(name, providers[name], stack_bytes) for name in resolution.providers)
        glue: wasmtime.Module | None = None
        if resolution.glue_provider is not None:
            wat = glue_wat(
                resolution.glue_provider,
                resolution.glue_version,
                resolution.glue_functions,
                resolution.glue_aliases,
                resolution.guest_memory,
            )
            glue = self._glue_module(wat, stack_bytes)
        linked = _Linked(
            entry=describe(None, 0, module, export),
            module=module,
            module_address=address_of(module),
            providers=prepared,
            memory_io=position[resolution.memory_io] if resolution.memory_io is not None else -1,
            glue=glue,
            glue_address=address_of(glue) if glue is not None else 0,
            glue_name=(resolution.glue_provider or "").encode(),
            guest_memory=resolution.guest_memory is not None,
            wasi=tuple(dict.fromkeys(s.name.encode() for s in resolution.sources if s.kind == WASI)),
        )
        with self._lock:
            self._linked.setdefault(module, {})[key] = linked
        return linked

    def _provider(self, name: str, module: wasmtime.Module, stack_bytes: int) -> _Provider:
        provider = self._providers.get(module)
        if provider is None or provider.name != name.encode():
            pre = self._linkers[stack_bytes].instantiate_pre(module)
            provider = _Provider(name.encode(), module, pre, address_of(pre), memory_exports(module))
            with self._lock:
                self._providers[module] = provider
        return provider

    def _glue_module(self, wat: str, stack_bytes: int) -> wasmtime.Module:
        key = (stack_bytes, wat)
        glue = self._glue.get(key)
        if glue is None:
            glue = wasmtime.Module(self._engines[stack_bytes], wat)
            with self._lock:
                if len(self._glue) >= _GLUE_CACHE_ENTRIES:
                    self._glue.pop(next(iter(self._glue)))
                self._glue[key] = glue
        return glue


def _staged(stage: str, step: Any, *args: Any) -> Any:
    """Run one step of a provider's own work; its failure is reported with the stage."""
    try:
        return step(*args)
    except (wasmtime.Trap, wasmtime.WasmtimeError, GuestExit, ExecutionError) as exc:
        raise Stage(stage, exc) from None
