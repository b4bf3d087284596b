"""Run one module under hard limits; the only place wasmtime's errors are translated.

The hot path per run: a new ``Store`` (one run never sees another's memory or globals), one
instantiation from an ``InstancePre`` prepared once per module, and one direct call of the entry
export whose type was checked once per module (``Func.__call__`` would look it up every call).

A provider-linked module (a JS runtime, a Shopify provider) is planned once per module and
providers, and instantiated per run from a linker of its own: the providers first (outside the
script's limits, with a memory-I/O provider's ``initialize``), then the Wasm API glue if it needs
one, then the module; after the entry, a memory-I/O provider's ``finalize`` gives the output and
logs. See ``engine/_abi.py`` for the ABIs and ``engine/_link.py`` for the linking rules.
"""

from __future__ import annotations

import ctypes
import dataclasses
import struct
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import wasmtime

from scriptpool.config import Limits
from scriptpool.config.errors import (
    ExecutionError,
    GuestRuntimeError,
    InstructionLimitExceeded,
    InvalidModule,
    InvalidOutput,
    MemoryLimitExceeded,
    StackOverflow,
    WallClockExceeded,
)
from scriptpool.engine._abi import GLUE_MEMORY_EXPORT, GUEST_MEMORY_MODULE, GUEST_MEMORY_NAME, glue_wat
from scriptpool.engine._capi import (
    EXTERN_FUNC,
    EXTERN_ITEM_OFFSET,
    EXTERN_MEMORY,
    VAL_I32,
    Extern,
    Instance,
    Val,
    address_of,
    check_internals,
    context_get_fuel,
    context_set_epoch_deadline,
    context_set_fuel,
    error_from,
    func_call,
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
    memory_data,
    memory_data_size,
    raise_error,
    store_context,
    store_delete,
    store_limiter,
    store_new,
    trap_code,
    trap_code_name,
    trap_from,
)
from scriptpool.engine._engine import EpochTicker, engine_stack_bytes, new_engine
from scriptpool.engine._link import WASI, resolve
from scriptpool.engine._profile import GuestProfiler
from scriptpool.engine._wasi import IDLE, GuestExit, GuestIO, HostState, WasiSubset
from scriptpool.engine._wasi import MODULE as WASI_MODULE

# memory.grow fails silently (returns -1) at the store limit, so a guest that then traps or
# exits non-zero is reported as out of memory when it stands within this much of its limit.
# 1 MiB covers the growth step of common allocators (dlmalloc, AssemblyScript's TLSF). Under a
# small limit the slack is a quarter of it, or every trap under a 1 MiB limit would count.
MEMORY_EXHAUSTION_SLACK = 1024 * 1024

# A provider's own work (instantiating it, and a memory-I/O provider's initialize and finalize)
# is not the script's: as in function-runner it runs with all the fuel there is and is not
# counted in the script's instructions. Time is what it costs the shard, so it is bounded by the
# script's own wall-clock limit: each of the two stages (instantiate and initialize; finalize)
# gets that limit afresh, and a provider-linked run ends within three times it.
_ALL_FUEL = (1 << 64) - 1

# finalize() returns the address of six little-endian u32: output ptr and len, then two log
# segments (ptr, len) that are the logs when concatenated.
_RESULTS = struct.Struct("<6I")


def memory_exhaustion_slack(limit_bytes: int) -> int:
    """How close to its memory limit a failing guest must be to count as out of memory."""
    return min(MEMORY_EXHAUSTION_SLACK, limit_bytes // 4)


@dataclass(frozen=True, slots=True)
class SandboxRun:
    """What one guest run produced: raw output (stdout, or a memory-I/O provider's output
    buffer), logs, the error if any, and its costs."""

    stdout: bytes
    logs: str
    error: ExecutionError | None
    instructions: int
    peak_memory_bytes: int
    instantiate_s: float
    run_s: float


_INSTANCE_SIZE = ctypes.sizeof(Instance)
_WASI_NAME = WASI_MODULE.encode()
_NAME_MEMORY = b"memory"
_NAME_GLUE_MEMORY = GLUE_MEMORY_EXPORT.encode()
_GUEST_MODULE = GUEST_MEMORY_MODULE.encode()
_GUEST_NAME = GUEST_MEMORY_NAME.encode()


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What running ``export`` of one module needs, worked out once per module and export."""

    pre: wasmtime.InstancePre | None  # imports resolved (None: linked per run); keeps the address valid
    pre_address: int
    name: bytes
    nparams: int | None  # None: no function export of that name
    nresults: int
    memories: tuple[bytes, ...]  # the module's memory exports, measured for the peak


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

    entry: _Prepared
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


class _Scratch(ctypes.Structure):
    """Out-parameters of the C calls one run makes (one per thread, reused by every run)."""

    _fields_ = (
        ("instance", Instance),
        ("extern", Extern),
        ("trap", ctypes.c_void_p),
        ("fuel", ctypes.c_uint64),
        ("results", Val * 4),
        ("args", Val * 1),
    )


class _Thread(HostState):
    """Per thread: the host-call state, and the scratch space of the run path."""

    def __init__(self) -> None:
        super().__init__()
        self.profiler: GuestProfiler | None = None  # set for the length of a profiled run
        self.scratch = _Scratch()
        base = ctypes.addressof(self.scratch)  # where each out-parameter lives:
        self.instance_at = base + _Scratch.instance.offset
        self.export_at = base + _Scratch.extern.offset
        self.item_at = self.export_at + EXTERN_ITEM_OFFSET
        self.trap_at = base + _Scratch.trap.offset
        self.fuel_at = base + _Scratch.fuel.offset
        self.results_at = base + _Scratch.results.offset
        self.args_at = base + _Scratch.args.offset


class _Stage(Exception):
    """A provider's step failed (``stage`` is instantiate, initialize or finalize): the error
    is reported with the stage in its detail."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(stage)
        self.stage = stage
        self.cause = cause


class Sandbox:
    """Compiles, loads and runs guest modules on engines configured for our limits.

    One per process. Engines are kept per Wasm stack size, because stack size is an engine
    setting and an extension point may override it.
    """

    def __init__(self, epoch_tick_ms: int = 5) -> None:
        check_internals()
        self._ticker = EpochTicker(epoch_tick_ms)
        # The ticker holds our engines; when this sandbox goes, its thread stops and lets them go.
        weakref.finalize(self, self._ticker.stop)
        self._engines: dict[int, wasmtime.Engine] = {}
        self._engine_addresses: dict[int, int] = {}
        self._linkers: dict[int, wasmtime.Linker] = {}
        self._linker_addresses: dict[int, int] = {}
        self._lock = threading.Lock()
        self._thread = _Thread()
        self._wasi = WasiSubset(self._thread)
        # Per module (dropped with it when the executor's cache evicts it): export -> _Prepared.
        self._prepared: weakref.WeakKeyDictionary[wasmtime.Module, dict[str, _Prepared]] = (
            weakref.WeakKeyDictionary()
        )
        # Per provider-linked module: (export, providers) -> _Linked; per provider: _Provider.
        self._linked: weakref.WeakKeyDictionary[wasmtime.Module, dict[tuple[Any, ...], _Linked]] = (
            weakref.WeakKeyDictionary()
        )
        self._providers: weakref.WeakKeyDictionary[wasmtime.Module, _Provider] = weakref.WeakKeyDictionary()
        # Glue modules, compiled once per engine and text (its guest memory limits vary).
        self._glue: dict[tuple[int, str], wasmtime.Module] = {}

    def engine(self, stack_bytes: int) -> wasmtime.Engine:
        """The engine for ``stack_bytes`` (rounded up to its class, :func:`engine_stack_bytes`),
        created (and ticked) on first use."""
        stack_bytes = engine_stack_bytes(stack_bytes)
        engine = self._engines.get(stack_bytes)
        if engine is None:
            with self._lock:
                engine = self._engines.get(stack_bytes)
                if engine is None:
                    engine = new_engine(stack_bytes)
                    self._ticker.add(engine)
                    linker = wasmtime.Linker(engine)
                    self._wasi.define(linker)
                    self._linkers[stack_bytes] = linker
                    self._linker_addresses[stack_bytes] = address_of(linker)
                    self._engine_addresses[stack_bytes] = address_of(engine)
                    self._engines[stack_bytes] = engine
        return engine

    def compile(self, wasm: bytes | str, stack_bytes: int) -> wasmtime.Module:
        """Compile Wasm bytes (the slow path: deploy, or a rejected artifact)."""
        try:
            return wasmtime.Module(self.engine(stack_bytes), wasm)
        except wasmtime.WasmtimeError as exc:
            raise InvalidModule(f"module does not compile: {one_line(exc)}") from None

    def deserialize(self, artifact: bytes, stack_bytes: int) -> wasmtime.Module:
        """Load an AOT artifact. Only ever call this on bytes whose signature verified."""
        try:
            return wasmtime.Module.deserialize(self.engine(stack_bytes), artifact)
        except wasmtime.WasmtimeError as exc:
            raise InvalidModule(f"artifact does not load: {one_line(exc)}") from None

    def run(
        self,
        module: wasmtime.Module,
        stdin: bytes,
        limits: Limits,
        *,
        export: str = "_start",
        providers: Mapping[str, wasmtime.Module] | None = None,
        profiler: GuestProfiler | None = None,
    ) -> SandboxRun:
        """Run ``export`` of ``module`` with ``stdin`` as input; never raises for guest faults.

        With a memory-I/O provider among ``providers``, ``stdin`` is written into the provider's
        memory instead, and the output and logs are read from it. With ``profiler``, the entry
        is sampled (``engine/_profile.py``); the run is otherwise the same, only slower.
        """
        if limits.stack_bytes not in self._engines:  # a stack size between classes: its class's
            limits = dataclasses.replace(limits, stack_bytes=engine_stack_bytes(limits.stack_bytes))
            self.engine(limits.stack_bytes)
        t = self._thread
        # A new store per run: no run ever sees another's memory, globals or tables.
        store = store_new(self._engine_addresses[limits.stack_bytes], None, None)
        context = store_context(store)
        io = GuestIO(stdin, limits.output_bytes, limits.log_bytes)
        instructions = 0
        if profiler is not None:
            named = [("script", module), *(providers or {}).items()]
            profiler.attach(self._engine_addresses[limits.stack_bytes], store, named, limits.wall_ms)
            t.profiler = profiler
        try:
            store_limiter(store, limits.memory_bytes, -1, -1, -1, -1)
            if providers:
                error, peak, instantiate_s, run_s, instructions = self._run_linked(
                    t, context, io, module, limits, export, providers
                )
            else:
                error, peak, instantiate_s, run_s = self._run_in(t, context, io, module, limits, export)
                context_get_fuel(context, t.fuel_at)
                instructions = limits.fuel - t.scratch.fuel
        finally:
            t.io = IDLE
            if profiler is not None:
                t.profiler = None
                profiler.finish(instructions)
            # Free the store (and give its pool slots back) now, on every path, even an
            # unexpected exception, whatever still refers to it.
            store_delete(store)
        return SandboxRun(
            stdout=bytes(io.stdout),
            logs=io.logs(),
            error=error,
            instructions=instructions,
            peak_memory_bytes=peak,
            instantiate_s=instantiate_s,
            run_s=run_s,
        )

    def _run_in(
        self,
        t: _Thread,
        context: int,
        io: GuestIO,
        module: wasmtime.Module,
        limits: Limits,
        export: str,
    ) -> tuple[ExecutionError | None, int, float, float]:
        """Set the store's limits, instantiate and call the entry: (error, peak memory bytes,
        instantiate seconds, run seconds). Guest faults come back as the error."""
        error: ExecutionError | None = None
        instantiated_ok = False
        started = time.perf_counter()
        instantiated = started
        try:
            failure = context_set_fuel(context, limits.fuel)  # what _meter does, inline: the hot path
            if failure:
                raise_error(failure)
            context_set_epoch_deadline(context, self._ticker.ticks_for(limits.wall_ms))
            io.start_clock(limits.wall_ms)
            t.io = io
            prepared = self._prepare(module, export, limits.stack_bytes)
            t.scratch.trap = None
            failure = instance_pre_instantiate(prepared.pre_address, context, t.instance_at, t.trap_at)
            _check(io, failure, t.scratch.trap)
            instantiated_ok = True
            instantiated = time.perf_counter()
            _call_entry(t, context, prepared, export, io)
            # The epoch is checked in guest code only: time since its last check counts too.
            io.check_deadline()
        except BaseException as exc:
            error = _translate(exc, (module,), limits)
        finished = time.perf_counter()
        if not instantiated_ok:
            instantiated = finished
        peak = _memory_bytes(t, context, t.instance_at, prepared.memories) if instantiated_ok else 0
        if error is not None:
            error = _out_of_memory(error, peak, limits)
        return error, peak, instantiated - started, finished - instantiated

    def _run_linked(
        self,
        t: _Thread,
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
                _staged("instantiate", _check, io, failure, t.scratch.trap)
                live.append((at, provider.memories))
                raise_error(linker_define_instance(linker, context, provider.name, len(provider.name), at))
            if plan.memory_io >= 0:
                _staged("initialize", _initialize, t, context, io, base + plan.memory_io * _INSTANCE_SIZE)
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
            _check(io, failure, t.scratch.trap)
            live.append((t.instance_at, plan.entry.memories))
            instantiated = time.perf_counter()
            _call_entry(t, context, plan.entry, export, io)
            io.check_deadline()
        except BaseException as exc:
            error = _translate(exc, plan.modules if plan is not None else (module,), limits)
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
                _staged("finalize", _finalize, t, context, io, base + plan.memory_io * _INSTANCE_SIZE)
            except BaseException as exc:
                if error is None:
                    error = _translate(exc, plan.modules, limits)
        finished = time.perf_counter()
        peak = max((_memory_bytes(t, context, at, names) for at, names in live), default=0)
        error = _out_of_memory(error, peak, limits)
        return error, peak, instantiated - started, finished - instantiated, instructions

    @staticmethod
    def _link_glue(t: _Thread, context: int, io: GuestIO, linker: int, plan: _Linked, at: int) -> None:
        """Instantiate the glue from the run's linker and define it beside its provider (and
        its guest memory as the module's memory import)."""
        t.scratch.trap = None
        failure = linker_instantiate(linker, context, plan.glue_address, at, t.trap_at)
        _check(io, failure, t.scratch.trap)
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
        self, t: _Thread, context: int, linker: int, names: tuple[bytes, ...], stack_bytes: int
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

    def _prepare(self, module: wasmtime.Module, export: str, stack_bytes: int) -> _Prepared:
        """The module's ``InstancePre`` and entry type, from the cache or worked out now."""
        per_module = self._prepared.get(module)
        prepared = per_module.get(export) if per_module is not None else None
        if prepared is None:
            # Raises WasmtimeError (an unknown import, say), translated like a failed instantiation.
            pre = self._linkers[stack_bytes].instantiate_pre(module)
            prepared = _describe(pre, address_of(pre), module, export)
            with self._lock:
                self._prepared.setdefault(module, {})[export] = prepared
        return prepared

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
            entry=_describe(None, 0, module, export),
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
            provider = _Provider(name.encode(), module, pre, address_of(pre), _memory_exports(module))
            with self._lock:
                self._providers[module] = provider
        return provider

    def _glue_module(self, wat: str, stack_bytes: int) -> wasmtime.Module:
        key = (stack_bytes, wat)
        glue = self._glue.get(key)
        if glue is None:
            glue = wasmtime.Module(self.engine(stack_bytes), wat)
            with self._lock:
                if len(self._glue) >= _GLUE_CACHE_ENTRIES:
                    self._glue.pop(next(iter(self._glue)))
                self._glue[key] = glue
        return glue


# Glue modules differ only by the guest's memory limits and the functions it imports: few.
_GLUE_CACHE_ENTRIES = 256
# Measured: cloning the engine's linker takes 6.5 µs, defining one WASI import on a new one 1.5.
_WASI_DEFINITIONS_PER_CLONE = 4


def _describe(
    pre: wasmtime.InstancePre | None, pre_address: int, module: wasmtime.Module, export: str
) -> _Prepared:
    nparams: int | None = None
    nresults = 0
    for item in module.exports:
        if item.name == export and isinstance(item.type, wasmtime.FuncType):
            nparams, nresults = len(item.type.params), len(item.type.results)
    return _Prepared(pre, pre_address, export.encode(), nparams, nresults, _memory_exports(module))


def _memory_exports(module: wasmtime.Module) -> tuple[bytes, ...]:
    return tuple(e.name.encode() for e in module.exports if isinstance(e.type, wasmtime.MemoryType))


def _staged(stage: str, step: Any, *args: Any) -> Any:
    """Run one step of a provider's own work; its failure is reported with the stage."""
    try:
        return step(*args)
    except (wasmtime.Trap, wasmtime.WasmtimeError, GuestExit, ExecutionError) as exc:
        raise _Stage(stage, exc) from None


def _call_i32(t: _Thread, context: int, io: GuestIO, instance: int, name: bytes, arg: int | None) -> int:
    """Call the export ``name`` of ``instance``, of type (i32) -> i32 or () -> i32."""
    if (
        not instance_export_get(context, instance, name, len(name), t.export_at)
        or t.scratch.extern.kind != EXTERN_FUNC
    ):
        raise InvalidModule(f"provider has no function export {name.decode()!r}")
    nargs = 0
    if arg is not None:
        t.scratch.args[0].kind = VAL_I32
        t.scratch.args[0].of.i32 = arg
        nargs = 1
    t.scratch.trap = None
    if t.profiler is None:
        failure = func_call(context, t.item_at, t.args_at, nargs, t.results_at, 1, t.trap_at)
    else:  # a profiled store takes async calls only, once its entry was called
        failure = t.profiler.call(
            context, t.item_at, t.args_at, nargs, t.results_at, 1, t.trap_at, entry=False
        )
    _check(io, failure, t.scratch.trap)
    return int(t.scratch.results[0].of.i32) & 0xFFFFFFFF


def _provider_memory(t: _Thread, context: int, instance: int) -> tuple[int, int]:
    """The memory-I/O provider's memory as it is now: (base address, size), valid until wasm
    runs again."""
    if (
        not instance_export_get(context, instance, _NAME_MEMORY, len(_NAME_MEMORY), t.export_at)
        or t.scratch.extern.kind != EXTERN_MEMORY
    ):
        raise InvalidModule("provider has no memory export named memory")
    return int(memory_data(context, t.item_at) or 0), int(memory_data_size(context, t.item_at))


def _span(memory: tuple[int, int], ptr: int, length: int, what: str) -> int:
    """The address of ``length`` bytes at ``ptr`` of the provider's memory, or
    :class:`InvalidOutput` if any of them lies outside it (an address or length from the
    provider is never trusted)."""
    base, size = memory
    if ptr + length > size:
        raise InvalidOutput(
            f"provider's {what} ({length} bytes at {ptr}) lies outside its {size}-byte memory",
            ptr=ptr,
            length=length,
        )
    return base + ptr


def _initialize(t: _Thread, context: int, io: GuestIO, instance: int) -> None:
    """``initialize(len) -> ptr``, then the input goes to ``ptr`` in the provider's memory."""
    data = io.stdin
    ptr = _call_i32(t, context, io, instance, b"initialize", len(data))
    ctypes.memmove(
        _span(_provider_memory(t, context, instance), ptr, len(data), "input buffer"), data, len(data)
    )


def _finalize(t: _Thread, context: int, io: GuestIO, instance: int) -> None:
    """``finalize() -> ptr``: the output and the two log segments named at ``ptr``."""
    ptr = _call_i32(t, context, io, instance, b"finalize", None)
    memory = _provider_memory(t, context, instance)
    results = ctypes.string_at(_span(memory, ptr, _RESULTS.size, "result pointers"), _RESULTS.size)
    out_ptr, out_len, log_ptr1, log_len1, log_ptr2, log_len2 = _RESULTS.unpack(results)
    output = _span(memory, out_ptr, out_len, "output")
    logs = (_span(memory, log_ptr1, log_len1, "logs"), _span(memory, log_ptr2, log_len2, "logs"))
    # Lengths come from the provider: copy no more than the room left under each limit.
    for address, length in ((logs[0], log_len1), (logs[1], log_len2)):
        take = min(length, io.log_room())
        if take:
            io.stderr += ctypes.string_at(address, take)
        io.logs_dropped += length - take
    io.reserve_stdout(out_len)
    io.stdout += ctypes.string_at(output, out_len)


def _call_entry(t: _Thread, context: int, prepared: _Prepared, export: str, io: GuestIO) -> None:
    """Call the entry export as ``Func.__call__`` would, without looking up its type again."""
    found = instance_export_get(context, t.instance_at, prepared.name, len(prepared.name), t.export_at)
    if prepared.nparams is None or not found or t.scratch.extern.kind != EXTERN_FUNC:
        raise InvalidModule(f"module has no function export {export!r}")
    if prepared.nparams:
        # What Func.__call__ raises; translated like a failed start.
        raise wasmtime.WasmtimeError(f"too few parameters provided: given 0, expected {prepared.nparams}")
    nresults = prepared.nresults
    # Results are dropped with the store (no unrooting needed); more than 4 go to a fresh array.
    results = t.results_at if nresults <= 4 else ctypes.addressof((Val * nresults)())
    t.scratch.trap = None
    if t.profiler is None:
        failure = func_call(context, t.item_at, None, 0, results, nresults, t.trap_at)
    else:
        failure = t.profiler.call(context, t.item_at, None, 0, results, nresults, t.trap_at, entry=True)
    _check(io, failure, t.scratch.trap)


def _check(io: GuestIO, failure: int | None, trap: int | None) -> None:
    """Raise what a failed entry into wasm means, as wasmtime-py's ``enter_wasm`` does: the
    exception a host function raised first, else the error, else the trap."""
    if not failure and not trap and io.raised is None:
        return
    error = error_from(failure) if failure else None  # each owns (and frees) its pointer
    trapped = trap_from(trap) if trap else None
    raised = io.take_raised()
    if raised is not None:
        raise raised
    if error is not None:
        raise error
    if trapped is not None:
        raise trapped


def one_line(exc: Exception) -> str:
    """wasmtime's messages span lines ("Caused by:" chains); errors we report are one line."""
    parts = [line.strip() for line in str(exc).splitlines()]
    return ": ".join(p for p in parts if p and p != "Caused by:")


def _translate(
    exc: BaseException, modules: Iterable[wasmtime.Module], limits: Limits
) -> ExecutionError | None:
    """What a failed step of a run is reported as: None for ``proc_exit(0)``, which is success
    (anything unexpected is a bug, and raised)."""
    if isinstance(exc, _Stage):
        error = _translate(exc.cause, modules, limits)
        if error is None:
            error = GuestRuntimeError(f"provider exited during {exc.stage}", exit_code=0)
        error.detail["stage"] = exc.stage
        return error
    if isinstance(exc, GuestExit):
        if exc.code == 0:
            return None
        return GuestRuntimeError(f"script exited with code {exc.code}", exit_code=exc.code)
    if isinstance(exc, ExecutionError):
        return exc
    if isinstance(exc, InvalidModule):
        return GuestRuntimeError(str(exc))
    if isinstance(exc, wasmtime.Trap):
        return _translate_trap(exc)
    if isinstance(exc, wasmtime.WasmtimeError):
        if _GC_HEAP_EXHAUSTED in str(exc):
            return MemoryLimitExceeded(
                f"script ran out of GC heap (limit {limits.memory_bytes} bytes)",
                limit=limits.memory_bytes,
                trap_code="gc_heap_out_of_memory",
            )
        return _translate_instantiation(exc, modules, limits)
    raise exc


# wasmtime gives these two failures no code of their own, only a message: matched here alone.
_GC_HEAP_EXHAUSTED = "GC heap out of memory"
_UNCAUGHT_EXCEPTION = "thrown Wasm exception"


def _out_of_memory(error: ExecutionError | None, peak: int, limits: Limits) -> ExecutionError | None:
    """A runtime error of a guest standing near its memory limit is reported as out of memory."""
    near_limit = peak + memory_exhaustion_slack(limits.memory_bytes) > limits.memory_bytes
    if isinstance(error, GuestRuntimeError) and near_limit:
        return MemoryLimitExceeded(
            f"script ran out of memory at {peak} bytes (limit {limits.memory_bytes})",
            limit=limits.memory_bytes,
            **error.detail,
        )
    return error


def _translate_trap(trap: wasmtime.Trap) -> ExecutionError:
    code = trap_code(trap)
    if code == wasmtime.TrapCode.OUT_OF_FUEL.value:
        return InstructionLimitExceeded("script used up its instruction budget")
    if code == wasmtime.TrapCode.INTERRUPT.value:
        return WallClockExceeded("script ran past its wall-clock deadline")
    if code == wasmtime.TrapCode.STACK_OVERFLOW.value:
        return StackOverflow("script exhausted its Wasm stack")
    if code is None and _UNCAUGHT_EXCEPTION in str(trap):
        return GuestRuntimeError(
            "script threw a Wasm exception that it did not catch", trap_code="uncaught_exception"
        )
    name = trap_code_name(code) if code is not None else "unknown"
    return GuestRuntimeError(f"script trapped: {name}", trap_code=name)


def _translate_instantiation(
    exc: wasmtime.WasmtimeError, modules: Iterable[wasmtime.Module], limits: Limits
) -> ExecutionError:
    declared = max((_declared_memory_bytes(m) for m in modules), default=0)
    if declared > limits.memory_bytes:
        return MemoryLimitExceeded(
            f"module declares {declared} bytes of memory (limit {limits.memory_bytes})",
            limit=limits.memory_bytes,
        )
    return GuestRuntimeError(f"script failed to start: {one_line(exc)}", trap_code="instantiation")


def _declared_memory_bytes(module: wasmtime.Module) -> int:
    """The largest initial size of a memory the module exports or imports: the limit holds for
    each memory on its own."""
    types = [e.type for e in module.exports] + [i.type for i in module.imports]
    pages = [t.limits.min for t in types if isinstance(t, wasmtime.MemoryType)]
    return max(pages, default=0) * 65536


def _memory_bytes(t: _Thread, context: int, instance: int, names: tuple[bytes, ...]) -> int:
    """Size of the largest of these exported memories of an instance (what it grew to), 0
    without one. Memories only grow, so that is the peak."""
    peak = 0
    for name in names:
        if (
            instance_export_get(context, instance, name, len(name), t.export_at)
            and t.scratch.extern.kind == EXTERN_MEMORY
        ):
            size = memory_data_size(context, t.item_at)
            if size > peak:
                peak = size
    return int(peak)
