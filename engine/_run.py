"""Run one module under hard limits; the only place wasmtime's errors are translated.

The hot path per run: a new ``Store`` (one run never sees another's memory or globals), one
instantiation from an ``InstancePre`` prepared once per module, and one direct call of the entry
export whose type was checked once per module (``Func.__call__`` would look it up every call).
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
from wasmtime import _ffi as ffi

from config import Limits
from config.errors import (
    ExecutionError,
    GuestRuntimeError,
    InstructionLimitExceeded,
    InvalidModule,
    MemoryLimitExceeded,
    StackOverflow,
    WallClockExceeded,
)
from engine._capi import (
    EXTERN_ITEM_OFFSET,
    check_internals,
    context_get_fuel,
    context_set_epoch_deadline,
    context_set_fuel,
    func_call,
    instance_export_get,
    instance_pre_instantiate,
    memory_data_size,
    store_context,
    store_delete,
    store_limiter,
    store_new,
)
from engine._engine import EpochTicker, new_engine
from engine._wasi import IDLE, GuestExit, GuestIO, HostState, WasiSubset

# memory.grow fails silently (returns -1) at the store limit, so a guest that then traps or
# exits non-zero is reported as out of memory when it stands within this much of its limit.
# 1 MiB covers the growth step of common allocators (dlmalloc, AssemblyScript's TLSF). Under a
# small limit the slack is a quarter of it, or every trap under a 1 MiB limit would count.
MEMORY_EXHAUSTION_SLACK = 1024 * 1024


def memory_exhaustion_slack(limit_bytes: int) -> int:
    """How close to its memory limit a failing guest must be to count as out of memory."""
    return min(MEMORY_EXHAUSTION_SLACK, limit_bytes // 4)


@dataclass(frozen=True, slots=True)
class SandboxRun:
    """What one guest run produced: raw stdout, logs, the error if any, and its costs."""

    stdout: bytes
    logs: str
    error: ExecutionError | None
    instructions: int
    peak_memory_bytes: int
    instantiate_s: float
    run_s: float


_FUNC = ffi.WASMTIME_EXTERN_FUNC.value
_MEMORY = ffi.WASMTIME_EXTERN_MEMORY.value
_TrapPointer = ctypes.POINTER(ffi.wasm_trap_t)
_ErrorPointer = ctypes.POINTER(ffi.wasmtime_error_t)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What running ``export`` of one module needs, worked out once per module and export."""

    pre: wasmtime.InstancePre  # imports resolved; keeps the address below valid
    pre_address: int
    name: bytes
    nparams: int | None  # None: no function export of that name
    nresults: int


class _Scratch(ctypes.Structure):
    """Out-parameters of the C calls one run makes (one per thread, reused by every run)."""

    _fields_ = (
        ("instance", ffi.wasmtime_instance_t),
        ("extern", ffi.wasmtime_extern_t),
        ("trap", ctypes.c_void_p),
        ("fuel", ctypes.c_uint64),
        ("results", ffi.wasmtime_val_t * 4),
    )


class _Thread(HostState):
    """Per thread: the host-call state, and the scratch space of the run path."""

    def __init__(self) -> None:
        super().__init__()
        self.scratch = _Scratch()
        base = ctypes.addressof(self.scratch)  # where each out-parameter lives:
        self.instance_at = base + _Scratch.instance.offset
        self.export_at = base + _Scratch.extern.offset
        self.item_at = self.export_at + EXTERN_ITEM_OFFSET
        self.trap_at = base + _Scratch.trap.offset
        self.fuel_at = base + _Scratch.fuel.offset
        self.results_at = base + _Scratch.results.offset


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
        self._lock = threading.Lock()
        self._thread = _Thread()
        self._wasi = WasiSubset(self._thread)
        # Per module (dropped with it when the executor's cache evicts it): export -> _Prepared.
        self._prepared: weakref.WeakKeyDictionary[wasmtime.Module, dict[str, _Prepared]] = (
            weakref.WeakKeyDictionary()
        )

    def engine(self, stack_bytes: int) -> wasmtime.Engine:
        """The engine for ``stack_bytes``, created (and ticked) on first use."""
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
                    self._engine_addresses[stack_bytes] = _address(engine.ptr())
                    self._engines[stack_bytes] = engine
        return engine

    def compile(self, wasm: bytes, stack_bytes: int) -> wasmtime.Module:
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
    ) -> SandboxRun:
        """Run ``export`` of ``module`` with ``stdin`` as input; never raises for guest faults."""
        engine = self.engine(limits.stack_bytes)
        t = self._thread
        # A new store per run: no run ever sees another's memory, globals or tables.
        owner = wasmtime.Store(engine) if providers else None  # providers need wasmtime-py's API
        store = (
            _address(owner.ptr())
            if owner
            else store_new(self._engine_addresses[limits.stack_bytes], None, None)
        )
        context = store_context(store)
        io = GuestIO(stdin, limits.output_bytes, limits.log_bytes)
        try:
            error, peak, instantiate_s, run_s = self._run_in(
                t, store, context, io, module, limits, export, owner, providers
            )
            context_get_fuel(context, t.fuel_at)
            instructions = limits.fuel - t.scratch.fuel
        finally:
            t.io = IDLE
            # Free the store (and give its pool slots back) now, on every path, even an
            # unexpected exception, whatever still refers to it.
            if owner is not None:
                owner.close()
            else:
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
        store: int,
        context: int,
        io: GuestIO,
        module: wasmtime.Module,
        limits: Limits,
        export: str,
        owner: wasmtime.Store | None,
        providers: Mapping[str, wasmtime.Module] | None,
    ) -> tuple[ExecutionError | None, int, float, float]:
        """Set the store's limits, instantiate and call the entry: (error, peak memory bytes,
        instantiate seconds, run seconds). Guest faults come back as the error."""
        error: ExecutionError | None = None
        instantiated_ok = False
        started = time.perf_counter()
        instantiated = started
        try:
            failure = context_set_fuel(context, limits.fuel)
            if failure:
                raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(failure, _ErrorPointer))
            store_limiter(store, limits.memory_bytes, -1, -1, -1, -1)
            context_set_epoch_deadline(context, self._ticker.ticks_for(limits.wall_ms))
            t.io = io
            if owner is not None and providers:
                prepared = self._prepare_linked(owner, module, export, providers, io)
            else:
                prepared = self._prepare(module, export, limits.stack_bytes)
            t.scratch.trap = None
            failure = instance_pre_instantiate(prepared.pre_address, context, t.instance_at, t.trap_at)
            _check(io, failure, t.scratch.trap)
            instantiated_ok = True
            instantiated = time.perf_counter()
            _call_entry(t, context, prepared, export, io)
        except GuestExit as exit_:
            if exit_.code != 0:
                error = GuestRuntimeError(f"script exited with code {exit_.code}", exit_code=exit_.code)
        except (ExecutionError, InvalidModule) as exc:
            error = exc if isinstance(exc, ExecutionError) else GuestRuntimeError(str(exc))
        except wasmtime.Trap as trap_:
            error = _translate_trap(trap_)
        except wasmtime.WasmtimeError as exc:
            error = _translate_instantiation(exc, module, limits)
        finished = time.perf_counter()
        if not instantiated_ok:
            instantiated = finished
        peak = _memory_bytes(t, context) if instantiated_ok else 0
        near_limit = peak + memory_exhaustion_slack(limits.memory_bytes) > limits.memory_bytes
        if isinstance(error, GuestRuntimeError) and near_limit:
            error = MemoryLimitExceeded(
                f"script ran out of memory at {peak} bytes (limit {limits.memory_bytes})",
                limit=limits.memory_bytes,
                **error.detail,
            )
        return error, peak, instantiated - started, finished - instantiated

    def _prepare(self, module: wasmtime.Module, export: str, stack_bytes: int) -> _Prepared:
        """The module's ``InstancePre`` and entry type, from the cache or worked out now."""
        per_module = self._prepared.get(module)
        prepared = per_module.get(export) if per_module is not None else None
        if prepared is None:
            # Raises WasmtimeError (an unknown import, say), translated like a failed instantiation.
            prepared = _describe(self._linkers[stack_bytes].instantiate_pre(module), module, export)
            with self._lock:
                self._prepared.setdefault(module, {})[export] = prepared
        return prepared

    def _prepare_linked(
        self,
        store: wasmtime.Store,
        module: wasmtime.Module,
        export: str,
        providers: Mapping[str, wasmtime.Module],
        io: GuestIO,
    ) -> _Prepared:
        # Provider instances belong to one store, so a provider-linked run gets its own linker.
        linker = wasmtime.Linker(store.engine)
        self._wasi.define(linker)
        try:
            for name, provider in providers.items():
                linker.define_instance(store, name, linker.instantiate(store, provider))
        except (wasmtime.Trap, wasmtime.WasmtimeError):
            # wasmtime-py raised for the trap our host callback returned: the cause goes first.
            raised = io.take_raised()
            if raised is not None:
                raise raised from None
            raise
        return _describe(linker.instantiate_pre(module), module, export)


def _address(pointer: Any) -> int:
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


def _describe(pre: wasmtime.InstancePre, module: wasmtime.Module, export: str) -> _Prepared:
    nparams: int | None = None
    nresults = 0
    for item in module.exports:
        if item.name == export and isinstance(item.type, wasmtime.FuncType):
            nparams, nresults = len(item.type.params), len(item.type.results)
    return _Prepared(pre, _address(pre.ptr()), export.encode(), nparams, nresults)


def _call_entry(t: _Thread, context: int, prepared: _Prepared, export: str, io: GuestIO) -> None:
    """Call the entry export as ``Func.__call__`` would, without looking up its type again."""
    found = instance_export_get(context, t.instance_at, prepared.name, len(prepared.name), t.export_at)
    if prepared.nparams is None or not found or t.scratch.extern.kind != _FUNC:
        raise InvalidModule(f"module has no function export {export!r}")
    if prepared.nparams:
        # What Func.__call__ raises; translated like a failed start.
        raise wasmtime.WasmtimeError(f"too few parameters provided: given 0, expected {prepared.nparams}")
    nresults = prepared.nresults
    # Results are dropped with the store (no unrooting needed); more than 4 go to a fresh array.
    results = t.results_at if nresults <= 4 else ctypes.addressof((ffi.wasmtime_val_t * nresults)())
    t.scratch.trap = None
    failure = func_call(context, t.item_at, None, 0, results, nresults, t.trap_at)
    _check(io, failure, t.scratch.trap)


def _check(io: GuestIO, failure: int | None, trap: int | None) -> None:
    """Raise what a failed entry into wasm means, as wasmtime-py's ``enter_wasm`` does: the
    exception a host function raised first, else the error, else the trap."""
    if not failure and not trap and io.raised is None:
        return
    error = wasmtime.WasmtimeError._from_ptr(ctypes.cast(failure, _ErrorPointer)) if failure else None
    trapped = wasmtime.Trap._from_ptr(ctypes.cast(trap, _TrapPointer)) if trap else None
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


def _translate_trap(trap: wasmtime.Trap) -> ExecutionError:
    code = trap.trap_code
    if code == wasmtime.TrapCode.OUT_OF_FUEL:
        return InstructionLimitExceeded("script used up its instruction budget")
    if code == wasmtime.TrapCode.INTERRUPT:
        return WallClockExceeded("script ran past its wall-clock deadline")
    if code == wasmtime.TrapCode.STACK_OVERFLOW:
        return StackOverflow("script exhausted its Wasm stack")
    name = code.name.lower() if code is not None else "unknown"
    return GuestRuntimeError(f"script trapped: {name}", trap_code=name)


def _translate_instantiation(
    exc: wasmtime.WasmtimeError, module: wasmtime.Module, limits: Limits
) -> ExecutionError:
    declared = _declared_memory_bytes(module)
    if declared > limits.memory_bytes:
        return MemoryLimitExceeded(
            f"module declares {declared} bytes of memory (limit {limits.memory_bytes})",
            limit=limits.memory_bytes,
        )
    return GuestRuntimeError(f"script failed to start: {one_line(exc)}", trap_code="instantiation")


def _declared_memory_bytes(module: wasmtime.Module) -> int:
    pages = 0
    for export in module.exports:
        if isinstance(export.type, wasmtime.MemoryType):
            pages += export.type.limits.min
    for imp in module.imports:
        if isinstance(imp.type, wasmtime.MemoryType):
            pages += imp.type.limits.min
    return pages * 65536


def _memory_bytes(t: _Thread, context: int) -> int:
    """Size of the instance's exported memory (what it grew to), 0 without one."""
    if (
        not instance_export_get(context, t.instance_at, b"memory", 6, t.export_at)
        or t.scratch.extern.kind != _MEMORY
    ):
        return 0
    return int(memory_data_size(context, t.item_at))
