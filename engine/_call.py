"""The run path's calls into wasm: per-thread scratch space for the C calls' out-parameters,
what an entry export needs (worked out once per module), and the call of that entry.

Both kinds of run use these: a plain one (``engine/_run.py``) and a provider-linked one
(``engine/_linked.py``). They are on the hot path of every run; see ``engine/_capi.py`` for why
they call wasmtime's C API directly.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import wasmtime

from scriptpool.config.errors import InvalidModule
from scriptpool.engine._capi import (
    EXTERN_FUNC,
    EXTERN_ITEM_OFFSET,
    EXTERN_MEMORY,
    Extern,
    Instance,
    Val,
    error_from,
    func_call,
    instance_export_get,
    memory_data_size,
    trap_from,
)
from scriptpool.engine._guest_io import GuestIO
from scriptpool.engine._profile import GuestProfiler
from scriptpool.engine._wasi import HostState


@dataclass(frozen=True, slots=True)
class Prepared:
    """What running ``export`` of one module needs, worked out once per module and export."""

    pre: wasmtime.InstancePre | None  # imports resolved (None: linked per run); keeps the address valid
    pre_address: int
    name: bytes
    nparams: int | None  # None: no function export of that name
    nresults: int
    memories: tuple[bytes, ...]  # the module's memory exports, measured for the peak


class Scratch(ctypes.Structure):
    """Out-parameters of the C calls one run makes (one per thread, reused by every run)."""

    _fields_ = (
        ("instance", Instance),
        ("extern", Extern),
        ("trap", ctypes.c_void_p),
        ("fuel", ctypes.c_uint64),
        ("results", Val * 4),
        ("args", Val * 1),
    )


class RunThread(HostState):
    """Per thread: the host-call state, and the scratch space of the run path."""

    def __init__(self) -> None:
        super().__init__()
        self.profiler: GuestProfiler | None = None  # set for the length of a profiled run
        self.scratch = Scratch()
        base = ctypes.addressof(self.scratch)  # where each out-parameter lives:
        self.instance_at = base + Scratch.instance.offset
        self.export_at = base + Scratch.extern.offset
        self.item_at = self.export_at + EXTERN_ITEM_OFFSET
        self.trap_at = base + Scratch.trap.offset
        self.fuel_at = base + Scratch.fuel.offset
        self.results_at = base + Scratch.results.offset
        self.args_at = base + Scratch.args.offset


def describe(
    pre: wasmtime.InstancePre | None, pre_address: int, module: wasmtime.Module, export: str
) -> Prepared:
    """What running ``export`` of ``module`` needs: its entry's type and its memory exports."""
    nparams: int | None = None
    nresults = 0
    for item in module.exports:
        if item.name == export and isinstance(item.type, wasmtime.FuncType):
            nparams, nresults = len(item.type.params), len(item.type.results)
    return Prepared(pre, pre_address, export.encode(), nparams, nresults, memory_exports(module))


def memory_exports(module: wasmtime.Module) -> tuple[bytes, ...]:
    """The names of the module's memory exports, whose sizes make a run's peak."""
    return tuple(e.name.encode() for e in module.exports if isinstance(e.type, wasmtime.MemoryType))


def call_entry(t: RunThread, context: int, prepared: Prepared, export: str, io: GuestIO) -> None:
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
    check_call(io, failure, t.scratch.trap)


def check_call(io: GuestIO, failure: int | None, trap: int | None) -> None:
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


def memory_bytes(t: RunThread, context: int, instance: int, names: tuple[bytes, ...]) -> int:
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
