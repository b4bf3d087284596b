"""Run one module under hard limits: the :class:`Sandbox`, its engines and its run path. A failed
step of a run is caught here (or in ``engine/_linked.py``) and translated into a named error by
``engine/_translate.py``; nothing else catches wasmtime's errors of a run.

The hot path per run: a new ``Store`` (one run never sees another's memory or globals), one
instantiation from an ``InstancePre`` prepared once per module, and one direct call of the entry
export whose type was checked once per module (``Func.__call__`` would look it up every call;
``engine/_call.py`` holds the calls).

A provider-linked module (a JS runtime, a Shopify provider) takes another path, in
``engine/_linked.py``: planned once per module and providers, instantiated per run from a linker
of its own.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import wasmtime

from scriptpool.config import Limits
from scriptpool.config.errors import ExecutionError, InvalidModule
from scriptpool.engine._call import Prepared, RunThread, call_entry, check_call, describe, memory_bytes
from scriptpool.engine._capi import (
    address_of,
    check_internals,
    context_get_fuel,
    context_set_epoch_deadline,
    context_set_fuel,
    instance_pre_instantiate,
    raise_error,
    store_context,
    store_delete,
    store_limiter,
    store_new,
)
from scriptpool.engine._engine import EpochTicker, engine_stack_bytes, new_engine
from scriptpool.engine._guest_io import IDLE, GuestIO
from scriptpool.engine._linked import LinkedRuns
from scriptpool.engine._profile import GuestProfiler
from scriptpool.engine._translate import one_line, out_of_memory, translate
from scriptpool.engine._wasi import WasiSubset


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
        self._thread = RunThread()
        self._wasi = WasiSubset(self._thread)
        # Per module (dropped with it when the executor's cache evicts it): export -> Prepared.
        self._prepared: weakref.WeakKeyDictionary[wasmtime.Module, dict[str, Prepared]] = (
            weakref.WeakKeyDictionary()
        )
        # Runs of a module linked to providers, and what they keep per module and provider.
        self._linked_runs = LinkedRuns(
            self._ticker,
            self._lock,
            self._engines,
            self._engine_addresses,
            self._linkers,
            self._linker_addresses,
        )

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
                error, peak, instantiate_s, run_s, instructions = self._linked_runs.run(
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
        t: RunThread,
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
            check_call(io, failure, t.scratch.trap)
            instantiated_ok = True
            instantiated = time.perf_counter()
            call_entry(t, context, prepared, export, io)
            # The epoch is checked in guest code only: time since its last check counts too.
            io.check_deadline()
        except BaseException as exc:
            error = translate(exc, (module,), limits)
        finished = time.perf_counter()
        if not instantiated_ok:
            instantiated = finished
        peak = memory_bytes(t, context, t.instance_at, prepared.memories) if instantiated_ok else 0
        if error is not None:
            error = out_of_memory(error, peak, limits)
        return error, peak, instantiated - started, finished - instantiated

    def _prepare(self, module: wasmtime.Module, export: str, stack_bytes: int) -> Prepared:
        """The module's ``InstancePre`` and entry type, from the cache or worked out now."""
        per_module = self._prepared.get(module)
        prepared = per_module.get(export) if per_module is not None else None
        if prepared is None:
            # Raises WasmtimeError (an unknown import, say), translated like a failed instantiation.
            pre = self._linkers[stack_bytes].instantiate_pre(module)
            prepared = describe(pre, address_of(pre), module, export)
            with self._lock:
                self._prepared.setdefault(module, {})[export] = prepared
        return prepared
