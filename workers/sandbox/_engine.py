"""The wasmtime engines workers run on, their fingerprint, the epoch ticker, and the wasmtime C
API calls the hot path makes directly (with the check that they still match wasmtime-py)."""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import mmap
import threading
from typing import Any

import structlog
import wasmtime
from wasmtime import _bindings as _generated
from wasmtime import _ffi as ffi

log = structlog.get_logger("scriptpool.worker")

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
}


def _wasmtime_version() -> str:
    return importlib.metadata.version("wasmtime")


def engine_fingerprint() -> str:
    """Identify the (wasmtime version, codegen config) an AOT artifact must match."""
    blob = json.dumps({"wasmtime": _wasmtime_version(), **_CODEGEN}, sort_keys=True)
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


def new_engine(stack_bytes: int, *, pooling: bool = True) -> wasmtime.Engine:
    """Build an engine with our codegen settings and the given Wasm stack limit.

    Pooled unless asked otherwise; where the pool's address space cannot be reserved (a tight
    ``ulimit -v``, say) the engine allocates per instance instead, slower but the same otherwise.
    """
    if pooling:
        # wasmtime aborts the whole process (a Rust panic) when it cannot map the pool, so ask first.
        if _can_reserve(pool_reservation_bytes()):
            return wasmtime.Engine(_config(stack_bytes, pooling=True))
        log.warning("pooling_allocator_unavailable", reservation_bytes=pool_reservation_bytes())
    return wasmtime.Engine(_config(stack_bytes, pooling=False))


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
    # Deterministic guests: the same input gives the same output on every machine.
    config.cranelift_nan_canonicalization = True
    if pooling:
        pool = ffi.wasmtime_pooling_allocation_config_new()
        try:
            for name, value in POOL_LIMITS.items():
                getattr(ffi, f"wasmtime_pooling_allocation_config_{name}_set")(pool, value)
            ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
        finally:
            ffi.wasmtime_pooling_allocation_config_delete(pool)
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


# -- the wasmtime internals the hot path relies on -----------------------------------------------
#
# wasmtime-py's public call path costs more than the guest itself: ``Func.__call__`` looks up the
# function type over FFI on every call, and every host call goes through a generic trampoline that
# wraps each argument and result in ``Val`` objects and the caller in a ``Caller`` (about 14 µs for
# a host call without arguments, 50 µs for ``fd_write``, against 0.3 µs and 10 µs here). So the
# sandbox calls the wasmtime C API that wasmtime-py loads (``wasmtime._ffi.dll``) itself on the
# hot path: the store, instantiating from an ``InstancePre``, calling the entry export (what
# ``Func.__call__`` does, with the type checked once per module), and the WASI host functions (raw
# "unchecked" callbacks, defined once per linker, that read their arguments straight from wasmtime's
# value array). Our prototypes pass every pointer as a plain address. :func:`check_internals`
# verifies all of it when a sandbox starts, and tests/test_engine.py runs it, so a wasmtime upgrade
# that changes any of it fails loudly instead of misbehaving.

# The wasmtime-py major version these internals were checked against (pyproject pins it too).
SUPPORTED_WASMTIME_MAJOR = 50

# One ``wasmtime_val_raw_t`` (a 16-byte union) per argument: an i32 argument ``k`` is u32 word 4k.
VAL_RAW_WORDS = 4

# A host function: (env, caller, args_and_results, len) -> 0, or a ``wasm_trap_t*`` to trap.
# The caller and the value array arrive as a plain address and a u32 view, which is what makes
# the raw callback cheap. Same C ABI as wasmtime-py's ``wasmtime_func_unchecked_callback_t``.
HOST_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t
)

# Where a ``wasmtime_extern_t`` keeps the func or memory handle (after its one-byte kind).
EXTERN_ITEM_OFFSET = 8

_P = ctypes.c_void_p


def _c_function(name: str, restype: Any, *argtypes: Any) -> Any:
    # ``dll[name]`` returns a fresh function object, so our prototype leaves wasmtime-py's alone.
    function = ffi.dll[name]
    function.restype = restype
    function.argtypes = argtypes
    return function


# Our prototypes (every pointer as a plain address) of the C functions host calls make ...
caller_export_get = _c_function(
    "wasmtime_caller_export_get", ctypes.c_bool, _P, ctypes.c_char_p, ctypes.c_size_t, _P
)
caller_context = _c_function("wasmtime_caller_context", _P, _P)
memory_data = _c_function("wasmtime_memory_data", _P, _P, _P)
memory_data_size = _c_function("wasmtime_memory_data_size", ctypes.c_size_t, _P, _P)
trap_new = _c_function("wasmtime_trap_new", _P, ctypes.c_char_p, ctypes.c_size_t)
linker_define_func_unchecked = _c_function(
    "wasmtime_linker_define_func_unchecked",
    _P,
    _P, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, _P, HOST_CALLBACK, _P, _P,
)  # fmt: skip
# ... and of those the run path makes: store, instantiation, entry call, its memory's size.
store_new = _c_function("wasmtime_store_new", _P, _P, _P, _P)
store_context = _c_function("wasmtime_store_context", _P, _P)
store_limiter = _c_function("wasmtime_store_limiter", None, _P, *[ctypes.c_int64] * 5)
store_delete = _c_function("wasmtime_store_delete", None, _P)
context_set_fuel = _c_function("wasmtime_context_set_fuel", _P, _P, ctypes.c_uint64)
context_get_fuel = _c_function("wasmtime_context_get_fuel", _P, _P, _P)
context_set_epoch_deadline = _c_function("wasmtime_context_set_epoch_deadline", None, _P, ctypes.c_uint64)
instance_pre_instantiate = _c_function("wasmtime_instance_pre_instantiate", _P, _P, _P, _P, _P)
instance_export_get = _c_function(
    "wasmtime_instance_export_get", ctypes.c_bool, _P, _P, ctypes.c_char_p, ctypes.c_size_t, _P
)
func_call = _c_function("wasmtime_func_call", _P, _P, _P, _P, ctypes.c_size_t, _P, ctypes.c_size_t, _P)
_OURS = {
    "wasmtime_store_new": store_new,
    "wasmtime_store_context": store_context,
    "wasmtime_store_limiter": store_limiter,
    "wasmtime_store_delete": store_delete,
    "wasmtime_context_set_fuel": context_set_fuel,
    "wasmtime_context_get_fuel": context_get_fuel,
    "wasmtime_context_set_epoch_deadline": context_set_epoch_deadline,
    "wasmtime_instance_pre_instantiate": instance_pre_instantiate,
    "wasmtime_instance_export_get": instance_export_get,
    "wasmtime_func_call": func_call,
    "wasmtime_caller_export_get": caller_export_get,
    "wasmtime_caller_context": caller_context,
    "wasmtime_memory_data": memory_data,
    "wasmtime_memory_data_size": memory_data_size,
    "wasmtime_trap_new": trap_new,
    "wasmtime_linker_define_func_unchecked": linker_define_func_unchecked,
}

# wasmtime-py's generated bindings and private helpers used as they are (as ``Func.__call__`` does).
_USED_AS_IS = {
    "wasmtime._ffi": (
        "wasmtime_extern_t",
        "wasmtime_instance_t",
        "wasmtime_error_t",
        "wasm_trap_t",
        "WASMTIME_EXTERN_FUNC",
        "WASMTIME_EXTERN_MEMORY",
        "wasmtime_pooling_allocation_config_new",
        "wasmtime_pooling_allocation_config_delete",
        "wasmtime_pooling_allocation_strategy_set",
        *(f"wasmtime_pooling_allocation_config_{name}_set" for name in POOL_LIMITS),
    ),
    "wasmtime.Trap": ("_from_ptr", "trap_code"),
    "wasmtime.WasmtimeError": ("_from_ptr",),
    "wasmtime.Engine": ("ptr",),
    "wasmtime.Store": ("_context", "close", "ptr"),
    "wasmtime.Linker": ("ptr", "instantiate_pre"),
    "wasmtime.InstancePre": ("ptr", "instantiate"),
    "wasmtime.Module": ("ptr", "exports"),
    "wasmtime.FuncType": ("ptr", "params", "results"),
}
_OWNERS = {
    "wasmtime._ffi": ffi,
    "wasmtime.Engine": wasmtime.Engine,
    "wasmtime.Trap": wasmtime.Trap,
    "wasmtime.WasmtimeError": wasmtime.WasmtimeError,
    "wasmtime.Store": wasmtime.Store,
    "wasmtime.Linker": wasmtime.Linker,
    "wasmtime.InstancePre": wasmtime.InstancePre,
    "wasmtime.Module": wasmtime.Module,
    "wasmtime.FuncType": wasmtime.FuncType,
}


def _shape(ctype: Any) -> str:
    """What the C ABI sees: any pointer (data, string or function) is one word."""
    if ctype is None:
        return "void"
    if ctype in (ctypes.c_void_p, ctypes.c_char_p) or issubclass(ctype, ctypes._Pointer):
        return "ptr"
    if hasattr(ctype, "_restype_"):  # a function pointer type
        return "ptr"
    return f"{ctype.__name__}:{ctypes.sizeof(ctype)}"


def internals_problems() -> list[str]:
    """Everything about wasmtime-py's internals that differs from what the hot path expects."""
    problems: list[str] = []
    major = int(_wasmtime_version().split(".")[0])
    if major != SUPPORTED_WASMTIME_MAJOR:
        problems.append(
            f"wasmtime {_wasmtime_version()} (internals checked for {SUPPORTED_WASMTIME_MAJOR}.x)"
        )
    for owner, names in _USED_AS_IS.items():
        problems += [f"{owner}.{name} is missing" for name in names if not hasattr(_OWNERS[owner], name)]
    for name, ours in _OURS.items():
        theirs = getattr(_generated, f"_{name}", None)
        if theirs is None:
            problems.append(f"wasmtime._bindings._{name} is missing")
            continue
        want = [_shape(t) for t in (theirs.restype, *theirs.argtypes)]
        have = [_shape(t) for t in (ours.restype, *ours.argtypes)]
        if want != have:
            problems.append(f"{name}: wasmtime-py declares {want}, we call it as {have}")
    callback = getattr(_generated, "wasmtime_func_unchecked_callback_t", None)
    if callback is None:
        problems.append("wasmtime._bindings.wasmtime_func_unchecked_callback_t is missing")
    else:
        want = [_shape(t) for t in (callback._restype_, *callback._argtypes_)]
        have = [_shape(t) for t in (HOST_CALLBACK._restype_, *HOST_CALLBACK._argtypes_)]
        if want != have:
            problems.append(f"host callback: wasmtime-py declares {want}, we define {have}")
    if ffi.wasmtime_extern_t.of.offset != EXTERN_ITEM_OFFSET:
        problems.append(f"wasmtime_extern_t keeps its item at {ffi.wasmtime_extern_t.of.offset}, not 8")
    if hasattr(ffi, "wasmtime_val_raw_t") and ctypes.sizeof(ffi.wasmtime_val_raw_t) != 4 * VAL_RAW_WORDS:
        problems.append(f"wasmtime_val_raw_t is {ctypes.sizeof(ffi.wasmtime_val_raw_t)} bytes, expected 16")
    return problems


def check_internals() -> None:
    """Refuse to run guests on a wasmtime-py whose internals differ from what we call."""
    problems = internals_problems()
    if problems:
        raise RuntimeError("wasmtime-py internals changed; update workers/sandbox: " + "; ".join(problems))
