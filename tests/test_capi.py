"""engine/_capi.py is the one file that knows wasmtime-py's insides: nothing else reaches into
them, and what it offers the rest of the engine (errors, traps, addresses, engine settings, raw
host functions) works on the wasmtime the lock installs."""

from __future__ import annotations

import ast
import ctypes
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest
import wasmtime

from scriptpool.config import Limits
from scriptpool.engine._capi import (
    HOST_CALLBACK,
    POOL_SETTINGS,
    VAL_RAW_WORDS,
    address_of,
    context_of,
    error_from,
    error_new,
    free_error,
    host_func,
    item_address,
    memory_data,
    raise_error,
    set_pooling_allocation,
    trap_code,
    trap_code_name,
    trap_from,
    trap_new,
    trap_new_code,
)
from scriptpool.engine._engine import POOL_LIMITS
from scriptpool.engine._translate import translate as _translate
from tests.conftest import ROOT

CAPI = ROOT / "engine" / "_capi.py"
# Everything of ours that imports wasmtime: the packages, the benchmark scripts and the tests.
SOURCES = ("config", "engine", "registry", "runtime", "workers", "producer", "scriptpool", "scripts", "tests")
# wasmtime 51 reports this code (component-model host calls out of fuel); wasmtime-py 51's
# TrapCode has no member for it.
HOSTCALL_FUEL_EXHAUSTED = 55


@cache
def _wasmtime_private_names() -> frozenset[str]:
    """The private attributes wasmtime-py's own source defines: methods and class attributes
    (``_from_ptr``, ``_context``) and what its objects set on themselves (``_func``)."""
    names: set[str] = set()
    for path in Path(wasmtime.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        names.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(item.target.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)  # self.x = ..., and the rare other.x = ...
    # Sunder names (``_fields_``) are ctypes', not wasmtime-py's.
    return frozenset(n for n in names if n.startswith("_") and not n.startswith("__") and not n.endswith("_"))


def _reaches_in(tree: ast.AST) -> list[tuple[int, str]]:
    """Where a module uses wasmtime-py's insides: an import of a private module of it, a private
    attribute of its objects, its ``dll`` or an object's raw ``ptr()``."""
    private = _wasmtime_private_names()
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("wasmtime._")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "wasmtime":
            if node.module.startswith("wasmtime._"):
                found.append((node.lineno, node.module))
            found += [(node.lineno, f"wasmtime.{a.name}") for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute):
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if (node.attr in private and not own) or node.attr in ("dll", "ptr"):
                found.append((node.lineno, f".{node.attr}"))
    return found


def test_only_capi_reaches_into_wasmtime_py() -> None:
    """No module but engine/_capi.py imports ``wasmtime._ffi`` or ``wasmtime._bindings``, calls
    ``_from_ptr`` or any private method, reads a private attribute, prototypes C functions on
    ``dll`` or takes an object's ``ptr()``: a wasmtime upgrade is then checked and fixed in one file."""
    offenders = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != CAPI:
                tree = ast.parse(path.read_text())
                offenders += [f"{path.relative_to(ROOT)}:{line} {what}" for line, what in _reaches_in(tree)]
    assert offenders == []


def test_the_layout_check_sees_each_kind_of_reaching_in() -> None:
    """The check above is not vacuous: each way of reaching in that the engine used before is
    found, and our own private attributes are not."""
    source = """
import wasmtime._bindings
from wasmtime import _ffi as ffi
from wasmtime._ffi import dll
raise wasmtime.WasmtimeError._from_ptr(failure)
context = store._context()
handle = func._func
function = ffi.dll["wasmtime_func_call"]
pointer = module.ptr()
self._func = None
"""
    found = sorted(what for _, what in _reaches_in(ast.parse(source)))
    assert found == sorted(
        [
            "wasmtime._bindings",
            "wasmtime._ffi",
            "wasmtime._ffi",
            "._from_ptr",
            "._context",
            "._func",
            ".dll",
            ".ptr",
        ]
    )
    assert {"_from_ptr", "_context", "_func", "_memory", "_from_raw"} <= _wasmtime_private_names()


def test_a_returned_error_is_wasmtime_py_s_exception() -> None:
    """``raise_error`` raises what a C call returned, and nothing for a null pointer;
    ``error_from`` and ``free_error`` take ownership without raising."""
    raise_error(None)
    raise_error(0)
    with pytest.raises(wasmtime.WasmtimeError, match="from the C API"):
        raise_error(error_new(b"from the C API"))
    assert "kept" in str(error_from(error_new(b"kept")))
    free_error(error_new(b"dropped"))
    free_error(None)


def test_traps_keep_their_code_and_message() -> None:
    """A trap a C call wrote comes back as wasmtime-py's ``Trap``, its code read from the C API:
    a trap with a code, and one without (a host's)."""
    coded = trap_from(trap_new_code(wasmtime.TrapCode.UNREACHABLE.value))
    assert isinstance(coded, wasmtime.Trap)
    assert trap_code(coded) == wasmtime.TrapCode.UNREACHABLE.value
    assert trap_code_name(wasmtime.TrapCode.UNREACHABLE.value) == "unreachable"
    message = b"host says no"
    plain = trap_from(trap_new(message, len(message)))
    assert trap_code(plain) is None and "host says no" in str(plain)


def test_a_trap_code_wasmtime_py_does_not_know_is_named_not_raised() -> None:
    """wasmtime 51 has trap codes wasmtime-py 51's ``TrapCode`` lacks; its ``Trap.trap_code``
    raised ValueError for them, which escaped ``Sandbox.run`` (that never raises for guest
    faults). Now such a trap is a runtime_error named from the C header."""
    trap = trap_from(trap_new_code(HOSTCALL_FUEL_EXHAUSTED))
    assert trap_code(trap) == HOSTCALL_FUEL_EXHAUSTED
    error = _translate(trap, (), Limits())
    assert error is not None
    assert (error.code, error.detail) == ("runtime_error", {"trap_code": "hostcall_fuel_exhausted"})
    assert trap_code_name(250) == "code_250"


def test_pooling_settings_are_checked_by_name() -> None:
    """The engine's pool limits are all settings _capi knows; another name is refused before
    anything reaches wasmtime."""
    assert set(POOL_LIMITS) <= POOL_SETTINGS
    with pytest.raises(ValueError, match="no pooling allocator setting named bogus"):
        set_pooling_allocation(wasmtime.Config(), {"bogus": 1})
    config = wasmtime.Config()
    set_pooling_allocation(config, {"total_memories": 4, "max_memory_size": 1 << 20})
    wasmtime.Engine(config)  # the pool it describes is usable


def test_a_raw_host_function_runs_and_items_have_addresses() -> None:
    """``host_func`` defines a raw callback on a wasmtime-py store; ``item_address`` and
    ``context_of`` give what the C calls take (the memory's data address, here)."""
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    seen: list[int] = []

    def add_one(env: int | None, caller: int, args: ctypes.Array[ctypes.c_uint32], count: int) -> int:
        seen.append(args[0])
        args[0] = args[0] + 1
        return 0

    callback = HOST_CALLBACK(add_one)
    i32 = wasmtime.ValType.i32()
    func = host_func(store, wasmtime.FuncType([i32], [i32]), callback)
    assert func(store, 41) == 42 and seen == [41]
    memory = wasmtime.Memory(store, wasmtime.MemoryType(wasmtime.Limits(1, None)))
    data = memory_data(context_of(store), item_address(memory))
    assert data == ctypes.cast(memory.data_ptr(store), ctypes.c_void_p).value
    assert address_of(engine) != 0 and VAL_RAW_WORDS == 4


def _child(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter at the repository root: a crash there is reported
    here instead of taking the test runner with it."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_an_engine_configuration_wasmtime_refuses_is_an_error_not_a_crash() -> None:
    """wasmtime 51's C API answers a configuration it refuses with a null engine (wasmtime 50
    aborted the process), which wasmtime-py 51 wraps as it is: using or freeing it crashed the
    process. ``engine_from`` refuses it with WasmtimeError, and the process goes on."""
    child = _child("""
        import wasmtime
        from scriptpool.engine._capi import engine_from, set_async_stack_size
        config = wasmtime.Config()
        config.max_wasm_stack = 4 << 20
        set_async_stack_size(config, 2 << 20)  # a Wasm stack past the async stack: refused
        try:
            engine_from(config)
        except wasmtime.WasmtimeError as exc:
            print("refused:", exc)
        engine = engine_from(wasmtime.Config())
        store = wasmtime.Store(engine)
        wasmtime.Instance(store, wasmtime.Module(engine, '(module (memory 1))'), [])
        print("then ran")
    """)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    assert child.stdout.splitlines() == [
        "refused: wasmtime refused the engine's configuration",
        "then ran",
    ]


def test_a_pool_wasmtime_cannot_map_falls_back_to_on_demand_allocation() -> None:
    """When the pool's address space goes between the check and wasmtime's mapping (here: the
    check is told yes under a 16 GiB address-space limit, and the pool needs about 260 GiB), the
    engine allocates per instance instead, says so, and runs guests."""
    child = _child("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))
        from scriptpool.config import Limits, configure_logging
        configure_logging(json=True)
        from scriptpool.engine import Sandbox, _engine
        from tests import guests
        _engine._can_reserve = lambda size: True
        sandbox = Sandbox()
        limits = Limits()
        run = sandbox.run(sandbox.compile(guests.ECHO, limits.stack_bytes), b'[1]', limits)
        print("ran:", run.error, run.stdout.decode())
    """)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    assert child.stdout.splitlines()[-1] == "ran: None [1]"
    assert "pooling_allocator_unavailable" in child.stdout + child.stderr
