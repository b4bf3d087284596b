"""A closed, deterministic subset of WASI preview 1, defined on a wasmtime ``Linker``.

Why our own rather than ``WasiConfig``: wasmtime-py's WASI reads stdin only from a file, and it
cannot fix clocks or random. Here stdin is the input bytes, stdout and stderr are bounded buffers,
clocks and random are fixed so a recorded run replays exactly, and there are no files, no env, no
args and no sockets: every such call answers with an errno, the way a closed sandbox should.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import wasmtime

from config.errors import OutputTooLarge

MODULE = "wasi_snapshot_preview1"

# Fixed clock: 2026-01-01T00:00:00Z in nanoseconds, for realtime and monotonic alike.
FIXED_TIME_NS = 1_767_225_600_000_000_000
FIXED_CLOCK_RESOLUTION_NS = 1_000
RANDOM_SEED = b"scriptpool-fixed-random"
TRUNCATION_MARKER = "\n…[logs truncated: {dropped} bytes dropped]"

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


@dataclass(slots=True)
class GuestIO:
    """The standard streams and random state of one execution."""

    stdin: bytes
    output_limit: int
    log_limit: int
    stdin_offset: int = 0
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    logs_dropped: int = 0
    random_counter: int = 0

    def write_stdout(self, data: bytes) -> None:
        if len(self.stdout) + len(data) > self.output_limit:
            raise OutputTooLarge(
                f"script wrote more than the {self.output_limit}-byte output limit",
                limit=self.output_limit,
            )
        self.stdout += data

    def write_stderr(self, data: bytes) -> None:
        room = self.log_limit - len(self.stderr)
        if room > 0:
            self.stderr += data[:room]
        self.logs_dropped += max(0, len(data) - max(room, 0))

    def logs(self) -> str:
        text = self.stderr.decode("utf-8", errors="replace")
        if self.logs_dropped:
            text += TRUNCATION_MARKER.format(dropped=self.logs_dropped)
        return text

    def random_bytes(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            block = self.random_counter.to_bytes(8, "little")
            out += hashlib.sha256(RANDOM_SEED + block).digest()
            self.random_counter += 1
        return bytes(out[:n])


def _memory(caller: wasmtime.Caller) -> memoryview:
    # The caller's own memory: a provider-linked guest may call us from the provider instance.
    mem = caller.get("memory")
    if not isinstance(mem, wasmtime.Memory):
        raise wasmtime.WasmtimeError("guest calls WASI without exporting its memory")
    return memoryview(mem.get_buffer_ptr(caller)).cast("B")


def _in_bounds(view: memoryview, ptr: int, length: int) -> bool:
    return ptr >= 0 and ptr + length <= len(view)


def _iovecs(view: memoryview, iovs: int, count: int) -> list[tuple[int, int]] | None:
    if not _in_bounds(view, iovs, 8 * count):
        return None
    vecs = [struct.unpack_from("<II", view, iovs + 8 * i) for i in range(count)]
    if any(not _in_bounds(view, ptr, length) for ptr, length in vecs):
        return None
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


class WasiSubset:
    """Host functions for ``wasi_snapshot_preview1``, reading the current run's :class:`GuestIO`."""

    def __init__(self, current_io: Callable[[], GuestIO]) -> None:
        self._io = current_io

    # -- the calls a JSON-in/JSON-out guest makes ----------------------------------------------
    def fd_write(self, caller: wasmtime.Caller, fd: int, iovs: int, count: int, nwritten: int) -> int:
        if fd not in (_STDOUT, _STDERR):
            return _EBADF
        view = _memory(caller)
        vecs = _iovecs(view, iovs, count)
        if vecs is None:
            return _EFAULT
        data = b"".join(view[ptr : ptr + length] for ptr, length in vecs)
        io = self._io()
        if fd == _STDOUT:
            io.write_stdout(data)
        else:
            io.write_stderr(data)
        return _store_u32(view, nwritten, len(data))

    def fd_read(self, caller: wasmtime.Caller, fd: int, iovs: int, count: int, nread: int) -> int:
        if fd != _STDIN:
            return _EBADF
        view = _memory(caller)
        vecs = _iovecs(view, iovs, count)
        if vecs is None:
            return _EFAULT
        io = self._io()
        total = 0
        for ptr, length in vecs:
            chunk = io.stdin[io.stdin_offset : io.stdin_offset + length]
            view[ptr : ptr + len(chunk)] = chunk
            io.stdin_offset += len(chunk)
            total += len(chunk)
            if len(chunk) < length:
                break
        return _store_u32(view, nread, total)

    def fd_fdstat_get(self, caller: wasmtime.Caller, fd: int, out: int) -> int:
        if fd not in (_STDIN, _STDOUT, _STDERR):
            return _EBADF
        view = _memory(caller)
        if not _in_bounds(view, out, 24):
            return _EFAULT
        struct.pack_into("<BxHxxxxQQ", view, out, _FILETYPE_UNKNOWN, 0, _STDIO_RIGHTS, 0)
        return _SUCCESS

    def fd_close(self, fd: int) -> int:
        return _SUCCESS if fd in (_STDIN, _STDOUT, _STDERR) else _EBADF

    def fd_seek(self, fd: int, offset: int, whence: int, out: int) -> int:
        return _ESPIPE if fd in (_STDIN, _STDOUT, _STDERR) else _EBADF

    def proc_exit(self, code: int) -> None:
        raise GuestExit(code)

    # -- fixed clocks and random ---------------------------------------------------------------
    def clock_time_get(self, caller: wasmtime.Caller, clock: int, precision: int, out: int) -> int:
        if clock > 3:
            return _EINVAL
        return _store_u64(_memory(caller), out, FIXED_TIME_NS)

    def clock_res_get(self, caller: wasmtime.Caller, clock: int, out: int) -> int:
        if clock > 3:
            return _EINVAL
        return _store_u64(_memory(caller), out, FIXED_CLOCK_RESOLUTION_NS)

    def random_get(self, caller: wasmtime.Caller, buf: int, length: int) -> int:
        view = _memory(caller)
        if not _in_bounds(view, buf, length):
            return _EFAULT
        view[buf : buf + length] = self._io().random_bytes(length)
        return _SUCCESS

    # -- an empty environment ------------------------------------------------------------------
    def sizes_get(self, caller: wasmtime.Caller, count_out: int, size_out: int) -> int:
        view = _memory(caller)
        return _store_u32(view, count_out, 0) or _store_u32(view, size_out, 0)

    def list_get(self, ptrs: int, buf: int) -> int:
        return _SUCCESS

    def fd_prestat_get(self, fd: int, out: int) -> int:
        return _EBADF  # no preopened directories: wasi-libc stops scanning at the first EBADF

    def sched_yield(self) -> int:
        return _SUCCESS

    def define(self, linker: wasmtime.Linker) -> None:
        """Define every function of our subset on ``linker``."""
        for name, params, results, func, caller in self._table():
            ty = wasmtime.FuncType([_VALTYPES[p] for p in params], [_VALTYPES[r] for r in results])
            linker.define_func(MODULE, name, ty, func, access_caller=caller)

    def _table(self) -> list[tuple[str, str, str, Callable[..., Any], bool]]:
        """(name, params, results, implementation, needs caller); 'i'=i32, 'I'=i64."""
        table: list[tuple[str, str, str, Callable[..., Any], bool]] = [
            ("fd_write", "iiii", "i", self.fd_write, True),
            ("fd_read", "iiii", "i", self.fd_read, True),
            ("fd_fdstat_get", "ii", "i", self.fd_fdstat_get, True),
            ("fd_close", "i", "i", self.fd_close, False),
            ("fd_seek", "iIii", "i", self.fd_seek, False),
            ("proc_exit", "i", "", self.proc_exit, False),
            ("clock_time_get", "iIi", "i", self.clock_time_get, True),
            ("clock_res_get", "ii", "i", self.clock_res_get, True),
            ("random_get", "ii", "i", self.random_get, True),
            ("args_sizes_get", "ii", "i", self.sizes_get, True),
            ("environ_sizes_get", "ii", "i", self.sizes_get, True),
            ("args_get", "ii", "i", self.list_get, False),
            ("environ_get", "ii", "i", self.list_get, False),
            ("fd_prestat_get", "ii", "i", self.fd_prestat_get, False),
            ("sched_yield", "", "i", self.sched_yield, False),
        ]
        for name, params, errno in _CLOSED:
            table.append((name, params, "i", _answer(errno), False))
        return table


def _answer(errno: int) -> Callable[..., int]:
    def closed(*_args: int) -> int:
        return errno

    return closed


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
    dummy = WasiSubset(lambda: GuestIO(b"", 0, 0))
    wide = {"i": "i32", "I": "i64"}
    return {
        name: (tuple(wide[p] for p in params), tuple(wide[r] for r in results))
        for name, params, results, *_ in dummy._table()
    }
