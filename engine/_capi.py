"""Everything the engine knows about wasmtime-py's insides, in one file.

The rest of the engine uses wasmtime-py's public API and what this module exports: our ctypes
prototypes of the wasmtime C API, the C structs the run path fills, and a few helpers that turn
raw pointers into wasmtime-py objects and back (errors, traps, addresses, engine settings
wasmtime-py has no property for, the guest profiler). No other module imports ``wasmtime._ffi``
or ``wasmtime._bindings``, or touches a private attribute of a wasmtime-py object
(tests/test_capi.py checks it), so a wasmtime upgrade is checked and fixed here.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
from collections.abc import Mapping, Sequence
from typing import Any

import wasmtime
from wasmtime import _bindings as _generated
from wasmtime import _ffi as ffi

# -- why the engine calls the C API itself -------------------------------------------------------
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
SUPPORTED_WASMTIME_MAJOR = 51


def wasmtime_version() -> str:
    """The installed wasmtime-py's version (part of the engine fingerprint)."""
    return importlib.metadata.version("wasmtime")


# -- the C structs the run path fills (wasmtime-py's generated ones: they follow the header) --
Extern = ffi.wasmtime_extern_t  # an export: a one-byte kind, then the item
Instance = ffi.wasmtime_instance_t
Val = ffi.wasmtime_val_t  # an argument or result of wasmtime_func_call
EXTERN_FUNC: int = ffi.WASMTIME_EXTERN_FUNC.value
EXTERN_MEMORY: int = ffi.WASMTIME_EXTERN_MEMORY.value
VAL_I32: int = ffi.WASMTIME_I32.value
# Where a ``wasmtime_extern_t`` keeps the func or memory handle (after its one-byte kind).
EXTERN_ITEM_OFFSET = 8
# One ``wasmtime_val_raw_t`` (a 16-byte union) per argument: an i32 argument ``k`` is u32 word 4k.
VAL_RAW_WORDS = 4

# A host function: (env, caller, args_and_results, len) -> 0, or a ``wasm_trap_t*`` to trap.
# The caller and the value array arrive as a plain address and a u32 view, which is what makes
# the raw callback cheap. Same C ABI as wasmtime-py's ``wasmtime_func_unchecked_callback_t``.
HOST_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t
)
# The epoch-deadline callback of a profiled store: (context, env, delta out, kind out) -> error.
EPOCH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint8),
)
EPOCH_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

_P = ctypes.c_void_p
# Every prototype of ours, by C name: what :func:`internals_problems` compares with wasmtime-py's.
PROTOTYPES: dict[str, Any] = {}


def _c_function(name: str, restype: Any, *argtypes: Any) -> Any:
    # ``dll[name]`` returns a fresh function object, so our prototype leaves wasmtime-py's alone.
    function = ffi.dll[name]
    function.restype = restype
    function.argtypes = argtypes
    PROTOTYPES[name] = function
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
# ... and those a provider-linked run makes: a linker of its own (the providers' instances
# belong to its store), with our WASI functions taken from the engine's linker.
linker_new = _c_function("wasmtime_linker_new", _P, _P)
linker_clone = _c_function("wasmtime_linker_clone", _P, _P)
linker_delete = _c_function("wasmtime_linker_delete", None, _P)
linker_allow_shadowing = _c_function("wasmtime_linker_allow_shadowing", None, _P, ctypes.c_bool)
linker_define = _c_function(
    "wasmtime_linker_define",
    _P,
    _P, _P, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, _P,
)  # fmt: skip
linker_define_instance = _c_function(
    "wasmtime_linker_define_instance", _P, _P, _P, ctypes.c_char_p, ctypes.c_size_t, _P
)
linker_instantiate = _c_function("wasmtime_linker_instantiate", _P, _P, _P, _P, _P, _P)
linker_get = _c_function(
    "wasmtime_linker_get", ctypes.c_bool, _P, _P, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
    ctypes.c_size_t, _P,
)  # fmt: skip
# ... and those a profiled run makes (``engine/_profile.py``): an async call that yields every N
# instructions, the epoch callback that samples the guest's stack, and wasmtime's guest profiler.
func_call_async = _c_function(
    "wasmtime_func_call_async", _P, _P, _P, _P, ctypes.c_size_t, _P, ctypes.c_size_t, _P, _P
)
call_future_poll = _c_function("wasmtime_call_future_poll", ctypes.c_bool, _P)
call_future_delete = _c_function("wasmtime_call_future_delete", None, _P)
context_fuel_async_yield_interval = _c_function(
    "wasmtime_context_fuel_async_yield_interval", _P, _P, ctypes.c_uint64
)
store_epoch_deadline_callback = _c_function(
    "wasmtime_store_epoch_deadline_callback", None, _P, EPOCH_CALLBACK, _P, EPOCH_FINALIZER
)
engine_increment_epoch = _c_function("wasmtime_engine_increment_epoch", None, _P)
guestprofiler_new = _c_function(
    "wasmtime_guestprofiler_new", _P, _P, _P, ctypes.c_uint64, _P, ctypes.c_size_t
)
guestprofiler_sample = _c_function("wasmtime_guestprofiler_sample", None, _P, _P, ctypes.c_uint64)
guestprofiler_finish = _c_function("wasmtime_guestprofiler_finish", _P, _P, _P)
guestprofiler_delete = _c_function("wasmtime_guestprofiler_delete", None, _P)
error_new = _c_function("wasmtime_error_new", _P, ctypes.c_char_p)
# ... and those behind the helpers below.
error_delete = _c_function("wasmtime_error_delete", None, _P)
trap_new_code = _c_function("wasmtime_trap_new_code", _P, ctypes.c_uint8)
_trap_code = _c_function("wasmtime_trap_code", ctypes.c_bool, _P, _P)
_config_async_stack_size_set = _c_function("wasmtime_config_async_stack_size_set", None, _P, ctypes.c_size_t)
_func_new_unchecked = _c_function("wasmtime_func_new_unchecked", None, _P, _P, HOST_CALLBACK, _P, _P, _P)

_ErrorPointer = ctypes.POINTER(ffi.wasmtime_error_t)
_TrapPointer = ctypes.POINTER(ffi.wasm_trap_t)


# -- pointers into wasmtime-py objects, errors and traps -----------------------------------------
def address_of(obj: Any) -> int:
    """The C pointer a wasmtime-py object (``Engine``, ``Config``, ``Linker``, ``Module``,
    ``InstancePre``, ``FuncType``, ``Trap``) wraps, as an address; valid while ``obj`` lives."""
    return ctypes.cast(obj.ptr(), ctypes.c_void_p).value or 0


def error_from(pointer: int) -> wasmtime.WasmtimeError:
    """The ``wasmtime_error_t*`` a C call returned, as wasmtime-py's exception (which owns and
    frees it; a WASI exit status comes back as its ``ExitTrap``)."""
    return wasmtime.WasmtimeError._from_ptr(ctypes.cast(pointer, _ErrorPointer))


def raise_error(pointer: int | None) -> None:
    """Raise the error a C call returned, if it returned one (a null pointer is success)."""
    if pointer:
        raise error_from(pointer)


def free_error(pointer: int | None) -> None:
    """Free an error a C call returned without raising it (another failure is reported)."""
    if pointer:
        error_delete(pointer)


def trap_from(pointer: int) -> wasmtime.Trap:
    """The ``wasm_trap_t*`` a C call wrote, as wasmtime-py's exception (which owns and frees it)."""
    return wasmtime.Trap._from_ptr(ctypes.cast(pointer, _TrapPointer))


def trap_code(trap: wasmtime.Trap) -> int | None:
    """The trap's ``wasmtime_trap_code_t``, None for a trap without one (a host's, an uncaught
    exception). Read from the C API: wasmtime-py's ``Trap.trap_code`` raises ValueError for a
    code its ``TrapCode`` lacks (wasmtime 51 has codes 50 to 55 that wasmtime-py 51 does not)."""
    code = ctypes.c_uint8()
    if _trap_code(address_of(trap), ctypes.addressof(code)):
        return code.value
    return None


def _trap_names() -> dict[int, str]:
    # wasmtime-py's spelling where it has one (the names reports have always used), else the C
    # header's without its prefix.
    names: dict[int, str] = {}
    for member in ffi.wasmtime_trap_code_enum:
        name = member.name.removeprefix("WASMTIME_TRAP_CODE_").removeprefix("WASMTIME_TRAP_")
        names[member.value] = name.lower()
    names.update({member.value: member.name.lower() for member in wasmtime.TrapCode})
    return names


_TRAP_NAMES = _trap_names()


def trap_code_name(code: int) -> str:
    """A trap code's name, lower case (``unreachable``, ``out_of_fuel``); ``code_N`` for a code
    no header of this wasmtime names."""
    return _TRAP_NAMES.get(code, f"code_{code}")


# -- engines: their creation, and settings wasmtime-py has no property for -----------------------
def engine_from(config: wasmtime.Config) -> wasmtime.Engine:
    """An engine with ``config`` (consumed), or WasmtimeError if wasmtime refuses the
    configuration (a Wasm stack past the async stack, a pool it cannot map).

    wasmtime 51's C API answers a refused configuration with a null engine, without a message
    (wasmtime 50 aborted the process), and wasmtime-py 51 wraps the null as it is: using or
    freeing that engine crashes the process. So it is let go here without being freed.
    """
    engine = wasmtime.Engine(config)
    if not engine.ptr():
        engine._consume()  # nothing to free: its destructor must not see the null
        raise wasmtime.WasmtimeError("wasmtime refused the engine's configuration")
    return engine


def set_async_stack_size(config: wasmtime.Config, size: int) -> None:
    """The stack of the fiber an async call (a profiled run) runs on, in bytes."""
    _config_async_stack_size_set(address_of(config), size)


# The pooling allocator's limits :func:`set_pooling_allocation` sets, by the C API's names.
POOL_SETTINGS = frozenset(
    {
        "total_stacks",
        "total_core_instances",
        "total_memories",
        "total_tables",
        "total_gc_heaps",
        "max_memories_per_module",
        "max_tables_per_module",
        "table_elements",
        "max_memory_size",
        "max_core_instance_size",
        "linear_memory_keep_resident",
        "table_keep_resident",
        "max_unused_warm_slots",
    }
)


def set_pooling_allocation(config: wasmtime.Config, limits: Mapping[str, int]) -> None:
    """Make ``config`` allocate instances from a pool with these limits (names of
    :data:`POOL_SETTINGS`; ValueError for another)."""
    unknown = sorted(set(limits) - POOL_SETTINGS)
    if unknown:
        raise ValueError(f"no pooling allocator setting named {', '.join(unknown)}")
    pool = ffi.wasmtime_pooling_allocation_config_new()
    try:
        for name, value in limits.items():
            getattr(ffi, f"wasmtime_pooling_allocation_config_{name}_set")(pool, value)
        ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
    finally:
        ffi.wasmtime_pooling_allocation_config_delete(pool)


# -- the guest profiler's inputs and output -------------------------------------------------------
def _name(text: str) -> Any:
    """A ``wasm_name_t`` we own (free it with ``wasm_byte_vec_delete``)."""
    vec = ffi.wasm_byte_vec_t()
    data = text.encode()
    buffer = ctypes.create_string_buffer(data, len(data))
    ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), ctypes.cast(buffer, ctypes.POINTER(ffi.wasm_byte_t)))
    return vec


def guestprofiler_start(
    engine: int, title: str, interval: int, modules: Sequence[tuple[str, wasmtime.Module]]
) -> int:
    """A new ``wasmtime_guestprofiler_t*`` recording frames of ``modules`` (named), 0 if
    wasmtime refused; free it with :func:`guestprofiler_read` or ``guestprofiler_delete``."""
    names = [_name(name) for name, _ in modules]
    table = (ffi.wasmtime_guestprofiler_modules_t * len(modules))()
    for row, ((_, module), name) in zip(table, zip(modules, names, strict=True), strict=True):
        row.name = ctypes.pointer(name)
        row.mod = module.ptr()
    vec = _name(title)
    try:
        return int(
            guestprofiler_new(engine, ctypes.addressof(vec), interval, ctypes.addressof(table), len(modules))
            or 0
        )
    finally:  # the profiler copies the names
        for name in (*names, vec):
            ffi.wasm_byte_vec_delete(ctypes.byref(name))


def guestprofiler_read(profiler: int) -> bytes:
    """Consume the profiler: its samples as wasmtime's Firefox-profiler JSON."""
    out = ffi.wasm_byte_vec_t()
    raise_error(guestprofiler_finish(profiler, ctypes.addressof(out)))
    try:
        return ctypes.string_at(out.data, out.size)
    finally:
        ffi.wasm_byte_vec_delete(ctypes.byref(out))


# -- for benchmarks and tests that build host functions on a wasmtime-py Store ------------------
def context_of(store: wasmtime.Store) -> int:
    """The ``wasmtime_context_t*`` of a wasmtime-py ``Store``."""
    return ctypes.cast(store._context(), ctypes.c_void_p).value or 0


def item_address(item: wasmtime.Func | wasmtime.Memory) -> int:
    """Where a wasmtime-py ``Func`` or ``Memory`` keeps its C handle (what ``func_call`` and
    ``memory_data`` take)."""
    handle = item._func if isinstance(item, wasmtime.Func) else item._memory
    return ctypes.addressof(handle)


def host_func(store: wasmtime.Store, ty: wasmtime.FuncType, callback: Any) -> wasmtime.Func:
    """A raw host function (``callback`` a :data:`HOST_CALLBACK`, kept alive by the caller) on
    ``store``, as a wasmtime-py ``Func``."""
    raw = ffi.wasmtime_func_t()
    _func_new_unchecked(context_of(store), address_of(ty), callback, None, None, ctypes.addressof(raw))
    return wasmtime.Func._from_raw(raw)


# -- the check ------------------------------------------------------------------------------------
# wasmtime-py's generated bindings and private helpers used as they are (as ``Func.__call__`` does).
_USED_AS_IS = {
    "wasmtime._ffi": (
        "dll",
        "wasmtime_extern_t",
        "wasmtime_instance_t",
        "wasmtime_error_t",
        "wasm_trap_t",
        "wasmtime_val_t",
        "wasmtime_func_t",
        "wasmtime_trap_code_enum",
        "WASMTIME_EXTERN_FUNC",
        "WASMTIME_EXTERN_MEMORY",
        "WASMTIME_I32",
        "wasm_byte_t",
        "wasm_byte_vec_t",
        "wasm_byte_vec_new",
        "wasm_byte_vec_delete",
        "wasmtime_guestprofiler_modules_t",
        "wasmtime_pooling_allocation_config_new",
        "wasmtime_pooling_allocation_config_delete",
        "wasmtime_pooling_allocation_strategy_set",
        *(f"wasmtime_pooling_allocation_config_{name}_set" for name in sorted(POOL_SETTINGS)),
    ),
    "wasmtime.Trap": ("_from_ptr", "ptr"),
    "wasmtime.WasmtimeError": ("_from_ptr",),
    "wasmtime.Func": ("_from_raw",),
    "wasmtime.Store": ("_context",),
    "wasmtime.Engine": ("ptr", "_consume"),
    "wasmtime.Config": ("ptr",),
    "wasmtime.Linker": ("ptr", "instantiate_pre"),
    "wasmtime.InstancePre": ("ptr",),
    "wasmtime.Module": ("ptr", "exports"),
    "wasmtime.FuncType": ("ptr", "params", "results"),
}
_OWNERS = {
    "wasmtime._ffi": ffi,
    "wasmtime.Trap": wasmtime.Trap,
    "wasmtime.WasmtimeError": wasmtime.WasmtimeError,
    "wasmtime.Func": wasmtime.Func,
    "wasmtime.Store": wasmtime.Store,
    "wasmtime.Engine": wasmtime.Engine,
    "wasmtime.Config": wasmtime.Config,
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


def _callback_problem(what: str, theirs: Any, ours: Any) -> str | None:
    want = [_shape(t) for t in (theirs._restype_, *theirs._argtypes_)]
    have = [_shape(t) for t in (ours._restype_, *ours._argtypes_)]
    return None if want == have else f"{what}: wasmtime-py declares {want}, we define {have}"


def internals_problems() -> list[str]:
    """Everything about wasmtime-py's internals that differs from what this module expects."""
    problems: list[str] = []
    major = int(wasmtime_version().split(".")[0])
    if major != SUPPORTED_WASMTIME_MAJOR:
        problems.append(f"wasmtime {wasmtime_version()} (internals checked for {SUPPORTED_WASMTIME_MAJOR}.x)")
    for owner, names in _USED_AS_IS.items():
        problems += [f"{owner}.{name} is missing" for name in names if not hasattr(_OWNERS[owner], name)]
    for name, ours in PROTOTYPES.items():
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
        problems.append(_callback_problem("host callback", callback, HOST_CALLBACK) or "")
    epoch = getattr(_generated, "_wasmtime_store_epoch_deadline_callback", None)
    if epoch is not None:
        problems.append(_callback_problem("epoch callback", epoch.argtypes[1], EPOCH_CALLBACK) or "")
    if Extern.of.offset != EXTERN_ITEM_OFFSET:
        problems.append(f"wasmtime_extern_t keeps its item at {Extern.of.offset}, not {EXTERN_ITEM_OFFSET}")
    if hasattr(ffi, "wasmtime_val_raw_t") and ctypes.sizeof(ffi.wasmtime_val_raw_t) != 4 * VAL_RAW_WORDS:
        problems.append(f"wasmtime_val_raw_t is {ctypes.sizeof(ffi.wasmtime_val_raw_t)} bytes, expected 16")
    code_type = getattr(_generated, "wasmtime_trap_code_t", None)
    if code_type is None or ctypes.sizeof(code_type) != 1:
        problems.append("wasmtime_trap_code_t is not one byte")
    return [p for p in problems if p]


def check_internals() -> None:
    """Refuse to run guests on a wasmtime-py whose internals differ from what we call."""
    problems = internals_problems()
    if problems:
        raise RuntimeError("wasmtime-py internals changed; update engine/_capi.py: " + "; ".join(problems))
