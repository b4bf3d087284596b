"""Run one module under hard limits; the only place wasmtime's errors are translated."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import wasmtime

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
from workers.sandbox._engine import EpochTicker, new_engine
from workers.sandbox._wasi import GuestExit, GuestIO, WasiSubset

# memory.grow fails silently (returns -1) at the store limit, so a guest that then traps or
# exits non-zero is reported as out of memory when it stands within this much of its limit.
# 1 MiB covers the growth step of common allocators (dlmalloc, AssemblyScript's TLSF).
MEMORY_EXHAUSTION_SLACK = 1024 * 1024


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


class Sandbox:
    """Compiles, loads and runs guest modules on engines configured for our limits.

    One per process. Engines are kept per Wasm stack size, because stack size is an engine
    setting and an extension point may override it.
    """

    def __init__(self, epoch_tick_ms: int = 5) -> None:
        self._ticker = EpochTicker(epoch_tick_ms)
        self._engines: dict[int, wasmtime.Engine] = {}
        self._linkers: dict[int, wasmtime.Linker] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._wasi = WasiSubset(self._current_io)

    def _current_io(self) -> GuestIO:
        io: GuestIO = self._local.io
        return io

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
        store = wasmtime.Store(engine)
        store.set_fuel(limits.fuel)
        store.set_limits(memory_size=limits.memory_bytes)
        store.set_epoch_deadline(self._ticker.ticks_for(limits.wall_ms))
        io = GuestIO(stdin, limits.output_bytes, limits.log_bytes)
        self._local.io = io
        error: ExecutionError | None = None
        instance: wasmtime.Instance | None = None
        started = time.perf_counter()
        instantiated = started
        try:
            linker = self._linker_for(store, limits.stack_bytes, providers)
            instance = linker.instantiate(store, module)
            instantiated = time.perf_counter()
            entry = instance.exports(store).get(export)
            if not isinstance(entry, wasmtime.Func):
                raise InvalidModule(f"module has no function export {export!r}")
            entry(store)
        except GuestExit as exit_:
            if exit_.code != 0:
                error = GuestRuntimeError(f"script exited with code {exit_.code}", exit_code=exit_.code)
        except (ExecutionError, InvalidModule) as exc:
            error = exc if isinstance(exc, ExecutionError) else GuestRuntimeError(str(exc))
        except wasmtime.Trap as trap:
            error = _translate_trap(trap)
        except wasmtime.WasmtimeError as exc:
            error = _translate_instantiation(exc, module, limits)
        finished = time.perf_counter()
        if instance is None:
            instantiated = finished
        peak = _memory_bytes(store, instance)
        if isinstance(error, GuestRuntimeError) and peak + MEMORY_EXHAUSTION_SLACK > limits.memory_bytes:
            error = MemoryLimitExceeded(
                f"script ran out of memory at {peak} bytes (limit {limits.memory_bytes})",
                limit=limits.memory_bytes,
                **error.detail,
            )
        self._local.io = None
        return SandboxRun(
            stdout=bytes(io.stdout),
            logs=io.logs(),
            error=error,
            instructions=limits.fuel - store.get_fuel(),
            peak_memory_bytes=peak,
            instantiate_s=instantiated - started,
            run_s=finished - instantiated,
        )

    def _linker_for(
        self,
        store: wasmtime.Store,
        stack_bytes: int,
        providers: Mapping[str, wasmtime.Module] | None,
    ) -> wasmtime.Linker:
        if not providers:
            return self._linkers[stack_bytes]
        # Provider instances belong to one store, so a provider-linked run gets its own linker.
        linker = wasmtime.Linker(store.engine)
        self._wasi.define(linker)
        for name, provider in providers.items():
            linker.define_instance(store, name, linker.instantiate(store, provider))
        return linker


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


def _memory_bytes(store: wasmtime.Store, instance: wasmtime.Instance | None) -> int:
    if instance is None:
        return 0
    memory = instance.exports(store).get("memory")
    return memory.data_len(store) if isinstance(memory, wasmtime.Memory) else 0
