"""The wasmtime engines guests run on: their configuration, fingerprint and epoch ticker."""

from __future__ import annotations

import hashlib
import json
import mmap
import threading

import wasmtime

from scriptpool.config import get_logger
from scriptpool.config.errors import ConfigurationError
from scriptpool.config.limits import LIMIT_RANGES, limit_problem
from scriptpool.engine._capi import (
    engine_from,
    set_async_stack_size,
    set_pooling_allocation,
    wasmtime_version,
)

log = get_logger("worker")

# The stack of the fiber a guest runs on when it is called asynchronously (a profiled run,
# engine/_profile.py): the Wasm stack and, below it, our host frames (WASI calls and the profiler's
# epoch callback are Python, reached through ctypes). wasmtime refuses a Wasm stack larger than
# this (50 with a panic that aborted the process, 51 with no engine: see engine_from), and a Wasm
# stack equal to it overflowed the fiber in a deep recursion, measured. 2 MiB is wasmtime's
# default, set here so that a new default cannot break the stack_bytes range (scriptpool.config.limits),
# whose top (1 MiB) leaves half of it to the host.
ASYNC_STACK_BYTES = 2 << 20
assert LIMIT_RANGES["stack_bytes"][1] <= ASYNC_STACK_BYTES // 2

# Everything here changes the machine code Cranelift emits, so it is part of the fingerprint an
# AOT artifact is compiled for. The stack size is not: wasmtime checks it at run time only
# (measured: an artifact from a 512 KiB engine loads into a 1 MiB one).
_CODEGEN = {
    "consume_fuel": True,
    "epoch_interruption": True,
    "cranelift_opt_level": "speed",
    "wasm_threads": False,
    "wasm_simd": True,
    "wasm_bulk_memory": True,
    "wasm_multi_value": True,
    "wasm_reference_types": True,
    # Two memories in one module: a trampolined Wasm API module imports its provider's memory
    # beside its own, and our glue for an untrampolined one copies between the two.
    "wasm_multi_memory": True,
}


def engine_fingerprint() -> str:
    """Identify the (wasmtime version, codegen config) an AOT artifact must match."""
    blob = json.dumps({"wasmtime": wasmtime_version(), **_CODEGEN}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The pooling instance allocator: every run still gets a new Store and a fresh instance, but its
# linear memory and tables come from slots reserved once per engine, reset (decommitted, the data
# image mapped copy-on-write again) when the store is freed. That replaces an mmap and munmap of a
# 4 GiB reservation per run: store + instantiate + drop measured 21.5 -> 9.6 µs p50 and about ten
# times less at p99. It does not change machine code, so artifacts load in either kind of engine.
# The per-module caps are far above what on-demand allocation ever refused, so that no module that
# ran before fails to fit (our store limiter, not the pool, still bounds memory). Each memory slot
# reserves 4 GiB of address space (not RAM): about 260 GiB of VSZ per engine. The first MiB of a
# freed memory is zeroed in place rather than decommitted, which spares the next run its page
# faults (hot trivial script p50 34 -> 29 µs, C discount script 100 -> 70 µs); at most 16 unused
# warm slots are kept, which bounds that resident memory to about 16 MiB.
_GUARD_BYTES = 32 << 20  # wasmtime's default guard region on each side of a memory slot
POOL_LIMITS = {
    # Fiber stacks for async calls (profiled runs only, one at a time): wasmtime's default of
    # 1,000 maps two areas each, about 2,000 memory mappings per engine, and an engine past
    # vm.max_map_count (65,530) aborts the process.
    "total_stacks": 16,
    "total_core_instances": 64,  # concurrent instances per engine: one per run, plus its providers
    "total_memories": 64,
    "total_tables": 128,
    "total_gc_heaps": 64,
    "max_memories_per_module": 8,
    "max_tables_per_module": 8,
    "table_elements": 1 << 20,
    "max_memory_size": 1 << 32,  # the wasm32 maximum: the store limiter is the real bound
    "max_core_instance_size": 16 << 20,
    "linear_memory_keep_resident": 1 << 20,
    "table_keep_resident": 64 << 10,
    "max_unused_warm_slots": 16,
}


def engine_stack_bytes(stack_bytes: int) -> int:
    """The Wasm stack of the engine that runs a script limited to ``stack_bytes``: the next power
    of two (16 KiB to 1 MiB). An engine per stack size is kept for the life of a process, and each
    costs address space and memory mappings, so any value an EP may set maps to one of seven.
    A size out of the ``stack_bytes`` range is :class:`ConfigurationError`."""
    problem = limit_problem("stack_bytes", stack_bytes)
    if problem is not None:
        raise ConfigurationError(problem, limit="stack_bytes")
    return max(1 << (stack_bytes - 1).bit_length(), LIMIT_RANGES["stack_bytes"][0])


def new_engine(stack_bytes: int, *, pooling: bool = True) -> wasmtime.Engine:
    """Build an engine with our codegen settings and the given Wasm stack limit.

    Pooled unless asked otherwise; where the pool's address space cannot be reserved (a tight
    ``ulimit -v``, say) the engine allocates per instance instead, slower but the same otherwise.
    A stack size out of the ``stack_bytes`` range is :class:`ConfigurationError`: wasmtime
    refuses some of them (wasmtime 50 aborted the process).
    """
    problem = limit_problem("stack_bytes", stack_bytes)
    if problem is not None:
        raise ConfigurationError(problem, limit="stack_bytes")
    if pooling:
        # Asked first, because wasmtime 50 aborted the whole process when it could not map the
        # pool; 51 refuses the engine, which covers the space going between check and map.
        if _can_reserve(pool_reservation_bytes()):
            try:
                return engine_from(_config(stack_bytes, pooling=True))
            except wasmtime.WasmtimeError:
                pass
        log.warning("pooling_allocator_unavailable", reservation_bytes=pool_reservation_bytes())
    return engine_from(_config(stack_bytes, pooling=False))


def compile_engine(stack_bytes: int) -> wasmtime.Engine:
    """An engine that only compiles (the registry's bounded compile, in a child process): the
    same codegen, so the same artifacts, without the pool's address-space reservation, and on
    one thread, so that a compile costs one core and its CPU time is its wall time."""
    config = _config(stack_bytes, pooling=False)
    config.parallel_compilation = False
    return engine_from(config)


def pool_reservation_bytes() -> int:
    """Address space one pooled engine maps up front (measured within 0.1%): memory slots with
    their guard regions, and table slots of 8-byte elements."""
    memory_slot = POOL_LIMITS["max_memory_size"] + 2 * _GUARD_BYTES
    table_slot = POOL_LIMITS["table_elements"] * 8
    return POOL_LIMITS["total_memories"] * memory_slot + POOL_LIMITS["total_tables"] * table_slot


def _can_reserve(size: int) -> bool:
    """Whether this process may map ``size`` bytes of inaccessible, unreserved address space."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    try:
        mmap.mmap(-1, size, flags=flags, prot=0).close()  # prot=0 is PROT_NONE
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _config(stack_bytes: int, *, pooling: bool) -> wasmtime.Config:
    config = wasmtime.Config()
    for name, value in _CODEGEN.items():
        setattr(config, name, value)
    config.max_wasm_stack = stack_bytes
    set_async_stack_size(config, ASYNC_STACK_BYTES)
    # Deterministic guests: the same input gives the same output on every machine.
    config.cranelift_nan_canonicalization = True
    if pooling:
        set_pooling_allocation(config, POOL_LIMITS)
    return config


class EpochTicker:
    """Advances the epoch of every registered engine every ``tick_ms``, from one daemon thread.

    wasmtime-py cannot interrupt a guest from a signal handler, so the wall-clock limit is an
    epoch deadline. ctypes drops the GIL while a guest runs, so this thread gets to tick.

    Engines are held strongly until :meth:`stop`: a weakly held engine can be picked up here
    while its ``__del__`` is deleting it (the GIL is released inside that C call), and ticking it
    then is a use-after-free. The owner stops the ticker when it goes away.
    """

    def __init__(self, tick_ms: int) -> None:
        self.tick_ms = tick_ms
        self._engines: tuple[wasmtime.Engine, ...] = ()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, engine: wasmtime.Engine) -> None:
        """Start ticking ``engine`` (and start the thread on first use)."""
        with self._lock:
            self._engines = (*self._engines, engine)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="epoch-ticker", daemon=True)
                self._thread.start()

    def ticks_for(self, wall_ms: int) -> int:
        """Epoch ticks that cover ``wall_ms``; one extra because the first tick may come at once."""
        return -(-wall_ms // self.tick_ms) + 1

    def stop(self) -> None:
        """Stop the thread and let go of the engines; they stop advancing."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            self._engines = ()

    def _run(self) -> None:
        interval = self.tick_ms / 1000
        while not self._stop.wait(interval):
            for engine in self._engines:  # a tuple, replaced whole: no lock needed to read it
                engine.increment_epoch()
