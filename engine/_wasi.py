"""A closed, deterministic subset of WASI preview 1, defined on a wasmtime ``Linker``.

Why our own rather than ``WasiConfig``: wasmtime-py's WASI reads stdin only from a file, and it
cannot fix clocks or random. Here stdin is the input bytes, stdout and stderr are bounded buffers,
clocks and random are fixed so a recorded run replays exactly, and there are no files, no env, no
args and no sockets: every such call answers with an errno, the way a closed sandbox should.

Host functions are raw wasmtime callbacks (see ``engine/_capi.py`` for why): each
reads its i32 arguments as u32 words of wasmtime's value array, finds the caller's memory, and
writes its errno back into the same array. A Python exception inside one (``proc_exit``, output
over its limit, a bug) is kept on the run's :class:`GuestIO` (``engine/_guest_io.py``) and the
call traps; the sandbox re-raises it once the guest has unwound, as wasmtime-py's own trampoline
does (but per thread, where wasmtime-py keeps one slot per process).
"""

from __future__ import annotations

import ctypes
import struct
import threading
from collections.abc import Callable
from typing import Any

import wasmtime

from scriptpool.engine._capi import (
    EXTERN_ITEM_OFFSET,
    EXTERN_MEMORY,
    HOST_CALLBACK,
    VAL_RAW_WORDS,
    Extern,
    address_of,
    caller_context,
    caller_export_get,
    linker_define_func_unchecked,
    memory_data,
    memory_data_size,
    raise_error,
    trap_new,
)
from scriptpool.engine._guest_io import IDLE

MODULE = "wasi_snapshot_preview1"

# Fixed clock: 2026-01-01T00:00:00Z in nanoseconds, for realtime and monotonic alike.
FIXED_TIME_NS = 1_767_225_600_000_000_000
FIXED_CLOCK_RESOLUTION_NS = 1_000

# A guest's arguments to a host call are input too: every call does work bounded by what the
# run may still use. At most IOV_MAX iovecs per fd_read or fd_write (Linux's writev limit: more
# is EINVAL, as there); bytes copied at most the room left under the output or log limit (stdout
# past it fails the run before anything is copied, stderr keeps what fits and counts the rest);
# random bytes produced in slices, between which the run's deadline is checked (``GuestIO``, in
# ``engine/_guest_io.py``). Time spent in host calls counts against the wall-clock limit: every
# call first checks the deadline.
IOV_MAX = 1024
SSIZE_MAX = (1 << 31) - 1  # a wasm32 ssize_t: iovecs whose lengths add up past it are EINVAL too

_SUCCESS, _EBADF, _EFAULT, _EINVAL, _ENOSYS, _ENOTSUP, _ESPIPE = 0, 8, 21, 28, 52, 58, 70
_STDIN, _STDOUT, _STDERR = 0, 1, 2
_FILETYPE_UNKNOWN = 0
# fd_read | fd_write rights; no seek/tell, so wasi-libc does not treat stdio as a terminal.
_STDIO_RIGHTS = (1 << 1) | (1 << 6)


class GuestExit(Exception):
    """Raised inside a host call when the guest calls ``proc_exit``; carries the exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"guest exited with code {code}")
        self.code = code


_W = VAL_RAW_WORDS  # stride of one argument in the u32 view of wasmtime's value array
_MEMORY = EXTERN_MEMORY
_NAME_MEMORY = b"memory"
_TRAP_MESSAGE = b"python exception"  # what wasmtime-py's trampoline traps with, too


class HostState(threading.local):
    """Per thread: the run in progress (``io``), and scratch space for host calls."""

    def __init__(self) -> None:
        self.io = IDLE  # the sandbox sets the run's GuestIO here for as long as the run lasts
        self.extern: Any = Extern()
        self.extern_address = ctypes.addressof(self.extern)
        # The last memory a host call looked at. Runs on a pooled engine reuse memory slots, so
        # this usually still fits the next run's memory.
        self.view = memoryview(bytearray())
        self.view_base: int | None = None
        self.view_size = 0


def _memory(state: HostState, caller: int) -> memoryview:
    """The caller's own memory (a provider-linked guest may call us from the provider instance).

    Valid until the guest runs again. Memory moves only when it grows, so a view is reused while
    the base address and size are unchanged: it then covers exactly that memory.
    """
    address = state.extern_address
    if not caller_export_get(caller, _NAME_MEMORY, 6, address) or state.extern.kind != _MEMORY:
        raise wasmtime.WasmtimeError("guest calls WASI without exporting its memory")
    context = caller_context(caller)
    base = memory_data(context, address + EXTERN_ITEM_OFFSET)
    size = memory_data_size(context, address + EXTERN_ITEM_OFFSET)
    if base != state.view_base or size != state.view_size:
        state.view_base, state.view_size = base, size
        state.view = memoryview((ctypes.c_ubyte * size).from_address(base)).cast("B") if size else _EMPTY
    return state.view


_EMPTY = memoryview(bytearray())


def _in_bounds(view: memoryview, ptr: int, length: int) -> bool:
    return ptr >= 0 and length >= 0 and ptr + length <= len(view)


def _iovecs(view: memoryview, iovs: int, count: int) -> list[tuple[int, int]] | int:
    """The (ptr, len) pairs of an iovec array, or the errno: EINVAL past IOV_MAX (checked before
    anything is read), EFAULT where the array or a buffer lies outside memory."""
    if count > IOV_MAX:
        return _EINVAL
    if not _in_bounds(view, iovs, 8 * count):
        return _EFAULT
    vecs = [struct.unpack_from("<II", view, iovs + 8 * i) for i in range(count)]
    if any(not _in_bounds(view, ptr, length) for ptr, length in vecs):
        return _EFAULT
    if sum(length for _, length in vecs) > SSIZE_MAX:
        return _EINVAL
    return vecs


def _store_u32(view: memoryview, ptr: int, value: int) -> int:
    if not _in_bounds(view, ptr, 4):
        return _EFAULT
    struct.pack_into("<I", view, ptr, value)
    return _SUCCESS


def _store_u64(view: memoryview, ptr: int, value: int) -> int:
    if not _in_bounds(view, ptr, 8):
        return _EFAULT
    struct.pack_into("<Q", view, ptr, value)
    return _SUCCESS


# A host function's implementation: (this thread's HostState, caller address, u32 argument words)
# -> errno, or None for a function without results. Argument k is ``a[k * _W]``.
Impl = Callable[[HostState, int, Any], "int | None"]


# -- the calls a JSON-in/JSON-out guest makes ----------------------------------------------------
def _fd_write(t: HostState, caller: int, a: Any) -> int:
    fd = a[0]
    if fd != _STDOUT and fd != _STDERR:
        return _EBADF
    view = _memory(t, caller)
    iovs, count = a[_W], a[2 * _W]
    vecs: list[tuple[int, int]] | int
    if count == 1:  # what wasi-libc's stdio and most guests pass: skip the list
        if not _in_bounds(view, iovs, 8):
            return _EFAULT
        ptr, length = struct.unpack_from("<II", view, iovs)
        if not _in_bounds(view, ptr, length):
            return _EFAULT
        if length > SSIZE_MAX:
            return _EINVAL
        vecs = [(ptr, length)]
    else:
        vecs = _iovecs(view, iovs, count)
        if isinstance(vecs, int):
            return vecs
    io = t.io
    written = io.append_stdout(view, vecs) if fd == _STDOUT else io.append_logs(view, vecs)
    return _store_u32(view, a[3 * _W], written)


def _fd_read(t: HostState, caller: int, a: Any) -> int:
    if a[0] != _STDIN:
        return _EBADF
    view = _memory(t, caller)
    vecs = _iovecs(view, a[_W], a[2 * _W])
    if isinstance(vecs, int):
        return vecs
    io = t.io
    total = 0
    for ptr, length in vecs:
        left = len(io.stdin) - io.stdin_offset
        if left <= 0:
            break
        take = min(length, left)
        view[ptr : ptr + take] = io.stdin[io.stdin_offset : io.stdin_offset + take]
        io.stdin_offset += take
        total += take
        if take < length:
            break
    return _store_u32(view, a[3 * _W], total)


def _fd_fdstat_get(t: HostState, caller: int, a: Any) -> int:
    if a[0] not in (_STDIN, _STDOUT, _STDERR):
        return _EBADF
    view = _memory(t, caller)
    out = a[_W]
    if not _in_bounds(view, out, 24):
        return _EFAULT
    struct.pack_into("<BxHxxxxQQ", view, out, _FILETYPE_UNKNOWN, 0, _STDIO_RIGHTS, 0)
    return _SUCCESS


def _fd_close(t: HostState, caller: int, a: Any) -> int:
    return _SUCCESS if a[0] in (_STDIN, _STDOUT, _STDERR) else _EBADF


def _fd_seek(t: HostState, caller: int, a: Any) -> int:
    return _ESPIPE if a[0] in (_STDIN, _STDOUT, _STDERR) else _EBADF


def _proc_exit(t: HostState, caller: int, a: Any) -> None:
    code = a[0]
    raise GuestExit(code - (1 << 32) if code >= 1 << 31 else code)  # exit codes read as i32


# -- fixed clocks and random ---------------------------------------------------------------------
def _clock_time_get(t: HostState, caller: int, a: Any) -> int:  # (clock, precision: i64, out)
    if a[0] > 3:
        return _EINVAL
    return _store_u64(_memory(t, caller), a[2 * _W], FIXED_TIME_NS)


def _clock_res_get(t: HostState, caller: int, a: Any) -> int:
    if a[0] > 3:
        return _EINVAL
    return _store_u64(_memory(t, caller), a[_W], FIXED_CLOCK_RESOLUTION_NS)


def _random_get(t: HostState, caller: int, a: Any) -> int:
    view = _memory(t, caller)
    buf, length = a[0], a[_W]
    if not _in_bounds(view, buf, length):
        return _EFAULT
    t.io.random_into(view, buf, length)
    return _SUCCESS


# -- an empty environment ------------------------------------------------------------------------
def _sizes_get(t: HostState, caller: int, a: Any) -> int:
    view = _memory(t, caller)
    return _store_u32(view, a[0], 0) or _store_u32(view, a[_W], 0)


def _list_get(t: HostState, caller: int, a: Any) -> int:
    return _SUCCESS


def _fd_prestat_get(t: HostState, caller: int, a: Any) -> int:
    return _EBADF  # no preopened directories: wasi-libc stops scanning at the first EBADF


def _sched_yield(t: HostState, caller: int, a: Any) -> int:
    return _SUCCESS


def _answer(errno: int) -> Impl:
    def closed(t: HostState, caller: int, a: Any) -> int:
        return errno

    return closed


# (name, params, results, implementation); 'i' = i32, 'I' = i64.
_TABLE: list[tuple[str, str, str, Impl]] = [
    ("fd_write", "iiii", "i", _fd_write),
    ("fd_read", "iiii", "i", _fd_read),
    ("fd_fdstat_get", "ii", "i", _fd_fdstat_get),
    ("fd_close", "i", "i", _fd_close),
    ("fd_seek", "iIii", "i", _fd_seek),
    ("proc_exit", "i", "", _proc_exit),
    ("clock_time_get", "iIi", "i", _clock_time_get),
    ("clock_res_get", "ii", "i", _clock_res_get),
    ("random_get", "ii", "i", _random_get),
    ("args_sizes_get", "ii", "i", _sizes_get),
    ("environ_sizes_get", "ii", "i", _sizes_get),
    ("args_get", "ii", "i", _list_get),
    ("environ_get", "ii", "i", _list_get),
    ("fd_prestat_get", "ii", "i", _fd_prestat_get),
    ("sched_yield", "", "i", _sched_yield),
]


class WasiSubset:
    """Host functions for ``wasi_snapshot_preview1``, reading the current run from ``state``.

    The raw callbacks are made once here and shared by every linker this subset defines them on,
    so keep it alive as long as those.
    """

    def __init__(self, state: HostState) -> None:
        self._state = state
        self._callbacks = [
            (name, params, results, self._callback(impl, bool(results)))
            for name, params, results, impl in _table()
        ]

    def _callback(self, impl: Impl, has_result: bool) -> Any:
        state = self._state

        def callback(env: int | None, caller: int, args: Any, count: int) -> int:
            try:
                state.io.check_deadline()
                result = impl(state, caller, args)
                if has_result:
                    args[0] = result
                return 0
            except BaseException as exc:
                # Nothing may escape a ctypes callback: keep the exception and trap instead.
                state.io.raised = exc
                return int(trap_new(_TRAP_MESSAGE, len(_TRAP_MESSAGE)) or 0)

        return HOST_CALLBACK(callback)

    def define(self, linker: wasmtime.Linker) -> None:
        """Define every function of our subset on ``linker``."""
        module = MODULE.encode()
        for name, params, results, callback in self._callbacks:
            ty = wasmtime.FuncType([_VALTYPES[p] for p in params], [_VALTYPES[r] for r in results])
            raw = name.encode()
            at, signature = address_of(linker), address_of(ty)
            raise_error(
                linker_define_func_unchecked(
                    at, module, len(module), raw, len(raw), signature, callback, None, None
                )
            )


def _table() -> list[tuple[str, str, str, Impl]]:
    return _TABLE + [(name, params, "i", _answer(errno)) for name, params, errno in _CLOSED]


# Calls a closed sandbox refuses: files, directories, sockets, signals and polling.
_CLOSED: list[tuple[str, str, int]] = [
    ("fd_prestat_dir_name", "iii", _EBADF),
    ("fd_fdstat_set_flags", "ii", _ENOTSUP),
    ("fd_fdstat_set_rights", "iII", _ENOTSUP),
    ("fd_filestat_get", "ii", _EBADF),
    ("fd_filestat_set_size", "iI", _EBADF),
    ("fd_filestat_set_times", "iIIi", _EBADF),
    ("fd_advise", "iIIi", _EBADF),
    ("fd_allocate", "iII", _EBADF),
    ("fd_datasync", "i", _EBADF),
    ("fd_sync", "i", _EBADF),
    ("fd_tell", "ii", _ESPIPE),
    ("fd_pread", "iiiIi", _EBADF),
    ("fd_pwrite", "iiiIi", _EBADF),
    ("fd_readdir", "iiiIi", _EBADF),
    ("fd_renumber", "ii", _EBADF),
    ("path_open", "iiiiiIIii", _EBADF),
    ("path_create_directory", "iii", _EBADF),
    ("path_filestat_get", "iiiii", _EBADF),
    ("path_filestat_set_times", "iiiiIIi", _EBADF),
    ("path_link", "iiiiiii", _EBADF),
    ("path_readlink", "iiiiii", _EBADF),
    ("path_remove_directory", "iii", _EBADF),
    ("path_rename", "iiiiii", _EBADF),
    ("path_symlink", "iiiii", _EBADF),
    ("path_unlink_file", "iii", _EBADF),
    ("poll_oneoff", "iiii", _ENOTSUP),
    ("proc_raise", "i", _ENOSYS),
    ("sock_accept", "iii", _ENOTSUP),
    ("sock_recv", "iiiiii", _ENOTSUP),
    ("sock_send", "iiiii", _ENOTSUP),
    ("sock_shutdown", "ii", _ENOTSUP),
]

_VALTYPES = {"i": wasmtime.ValType.i32(), "I": wasmtime.ValType.i64()}


def provided_signatures() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Every WASI function a module may import, with its (params, results) value types."""
    wide = {"i": "i32", "I": "i64"}
    return {
        name: (tuple(wide[p] for p in params), tuple(wide[r] for r in results))
        for name, params, results, _ in _table()
    }
