"""The memory-I/O provider ABI (a Shopify provider, say): before the script runs, the input is
written into the provider's memory where its ``initialize(len) -> ptr`` asks; after it,
``finalize() -> ptr`` names the output and log segments, which are read from that memory.

An address or length from the provider is never trusted: each is checked against the provider's
memory (:class:`InvalidOutput`), and no more is copied than the run's output and log limits
allow. ``engine/_linked.py`` calls these, as stages of a provider-linked run.
"""

from __future__ import annotations

import ctypes
import struct

from scriptpool.config.errors import InvalidModule, InvalidOutput
from scriptpool.engine._call import RunThread, check_call
from scriptpool.engine._capi import (
    EXTERN_FUNC,
    EXTERN_MEMORY,
    VAL_I32,
    func_call,
    instance_export_get,
    memory_data,
    memory_data_size,
)
from scriptpool.engine._guest_io import GuestIO

# finalize() returns the address of six little-endian u32: output ptr and len, then two log
# segments (ptr, len) that are the logs when concatenated.
_RESULTS = struct.Struct("<6I")
_NAME_MEMORY = b"memory"


def _call_i32(t: RunThread, context: int, io: GuestIO, instance: int, name: bytes, arg: int | None) -> int:
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
    check_call(io, failure, t.scratch.trap)
    return int(t.scratch.results[0].of.i32) & 0xFFFFFFFF


def _provider_memory(t: RunThread, context: int, instance: int) -> tuple[int, int]:
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


def initialize(t: RunThread, context: int, io: GuestIO, instance: int) -> None:
    """``initialize(len) -> ptr``, then the input goes to ``ptr`` in the provider's memory."""
    data = io.stdin
    ptr = _call_i32(t, context, io, instance, b"initialize", len(data))
    ctypes.memmove(
        _span(_provider_memory(t, context, instance), ptr, len(data), "input buffer"), data, len(data)
    )


def finalize(t: RunThread, context: int, io: GuestIO, instance: int) -> None:
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
