"""The wasmtime C API calls the hot path makes directly, and the check that they still match
wasmtime-py's internals."""

from __future__ import annotations

import ctypes
from typing import Any

import wasmtime
from wasmtime import _bindings as _generated
from wasmtime import _ffi as ffi

from engine._engine import POOL_LIMITS, wasmtime_version

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
SUPPORTED_WASMTIME_MAJOR = 51

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
# ... and those a provider-linked run makes: a linker of its own (the providers' instances
# belong to its store), with our WASI functions taken from the engine's linker.
linker_new = _c_function("wasmtime_linker_new", _P, _P)
linker_clone = _c_function("wasmtime_linker_clone", _P, _P)
linker_delete = _c_function("wasmtime_linker_delete", None, _P)
linker_allow_shadowing = _c_function("wasmtime_linker_allow_shadowing", None, _P, ctypes.c_bool)
linker_define = _c_function(
    "wasmtime_linker_define",
    _P,
    _P,
    _P,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_char_p,
    ctypes.c_size_t,
    _P,
)
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
EPOCH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint8),
)
EPOCH_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
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
    "wasmtime_linker_new": linker_new,
    "wasmtime_linker_clone": linker_clone,
    "wasmtime_linker_delete": linker_delete,
    "wasmtime_linker_allow_shadowing": linker_allow_shadowing,
    "wasmtime_linker_define": linker_define,
    "wasmtime_linker_define_instance": linker_define_instance,
    "wasmtime_linker_instantiate": linker_instantiate,
    "wasmtime_linker_get": linker_get,
    "wasmtime_caller_export_get": caller_export_get,
    "wasmtime_caller_context": caller_context,
    "wasmtime_memory_data": memory_data,
    "wasmtime_memory_data_size": memory_data_size,
    "wasmtime_trap_new": trap_new,
    "wasmtime_linker_define_func_unchecked": linker_define_func_unchecked,
    "wasmtime_func_call_async": func_call_async,
    "wasmtime_call_future_poll": call_future_poll,
    "wasmtime_call_future_delete": call_future_delete,
    "wasmtime_context_fuel_async_yield_interval": context_fuel_async_yield_interval,
    "wasmtime_store_epoch_deadline_callback": store_epoch_deadline_callback,
    "wasmtime_engine_increment_epoch": engine_increment_epoch,
    "wasmtime_guestprofiler_new": guestprofiler_new,
    "wasmtime_guestprofiler_sample": guestprofiler_sample,
    "wasmtime_guestprofiler_finish": guestprofiler_finish,
    "wasmtime_guestprofiler_delete": guestprofiler_delete,
    "wasmtime_error_new": error_new,
}

# wasmtime-py's generated bindings and private helpers used as they are (as ``Func.__call__`` does).
_USED_AS_IS = {
    "wasmtime._ffi": (
        "wasmtime_extern_t",
        "wasmtime_instance_t",
        "wasmtime_error_t",
        "wasm_trap_t",
        "wasmtime_val_t",
        "WASMTIME_EXTERN_FUNC",
        "WASMTIME_EXTERN_MEMORY",
        "WASMTIME_I32",
        "wasm_byte_vec_t",
        "wasm_byte_vec_new",
        "wasm_byte_vec_delete",
        "wasmtime_guestprofiler_modules_t",
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
    major = int(wasmtime_version().split(".")[0])
    if major != SUPPORTED_WASMTIME_MAJOR:
        problems.append(f"wasmtime {wasmtime_version()} (internals checked for {SUPPORTED_WASMTIME_MAJOR}.x)")
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
    epoch = getattr(_generated, "_wasmtime_store_epoch_deadline_callback", None)
    if epoch is not None:
        theirs = epoch.argtypes[1]
        want = [_shape(t) for t in (theirs._restype_, *theirs._argtypes_)]
        have = [_shape(t) for t in (EPOCH_CALLBACK._restype_, *EPOCH_CALLBACK._argtypes_)]
        if want != have:
            problems.append(f"epoch callback: wasmtime-py declares {want}, we define {have}")
    if ffi.wasmtime_extern_t.of.offset != EXTERN_ITEM_OFFSET:
        problems.append(f"wasmtime_extern_t keeps its item at {ffi.wasmtime_extern_t.of.offset}, not 8")
    if hasattr(ffi, "wasmtime_val_raw_t") and ctypes.sizeof(ffi.wasmtime_val_raw_t) != 4 * VAL_RAW_WORDS:
        problems.append(f"wasmtime_val_raw_t is {ctypes.sizeof(ffi.wasmtime_val_raw_t)} bytes, expected 16")
    return problems


def check_internals() -> None:
    """Refuse to run guests on a wasmtime-py whose internals differ from what we call."""
    problems = internals_problems()
    if problems:
        raise RuntimeError("wasmtime-py internals changed; update engine/: " + "; ".join(problems))
