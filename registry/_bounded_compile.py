"""Compiling a module in a child process bounded in time and memory.

Cranelift's work grows faster than a module's size for some shapes of code (many loops or
branches in one function, many locals live across branches): a 234 KB module took 55 s and
1.7 GB to compile in process. The structural caps (``registry/_structure.py``) refuse the
extreme shapes; everything else compiles here, in a child process that the caller kills when its
time is up, and that the kernel stops when it maps more memory than it may (``RLIMIT_AS``) or
burns more CPU than it may (``RLIMIT_CPU``, should the caller be gone). Either is
:class:`ModuleTooComplex`; a module that is merely invalid is :class:`InvalidModule` with
wasmtime's message, as an in-process compile gave it. The child sends back the serialized
artifact, which the caller loads into its own engine (``Sandbox.deserialize``).

The bounds grow with the module (:meth:`Bounds.for_size`), because a large provider takes
longer to compile than a script: 2 s plus 8 s per MiB, and 512 MiB plus 32 bytes per byte of
module. Measured with one compile thread, as the child compiles: a 50 KB C script takes 0.1 s
and 72 MiB of address space, a 2.4 MB C module 5 s and 161 MiB, so real modules stay several
times inside their bounds.

Children are forked by a compile server: a small process each caller process starts on its
first compile, or earlier with :func:`start_compile_server` (``python -S -c``, loading this file
and what it imports, not the rest of the registry package, nor site, nor anything of the
caller's state; running no thread), which forks one child per compile and reaps it. Its
start-up is most of a process's first compile (about 0.5 s): a command that will compile starts
it first, so that it loads while the command does its own work. Forking the caller itself would copy
a process with threads running (the sandbox's epoch ticker, wasmtime's compile pool, which a
forked child would find gone); a fresh interpreter per compile costs 0.8 s here, a fork from the
server about 50 ms. multiprocessing's forkserver would do the forking too, but re-imports the
caller's ``__main__`` in every child. A process compiles one module at a time (a lock), so a
compile costs at most one core of the machine.

The server answers over its standard output with length-prefixed frames: the child's pid as
soon as it is forked (so the caller can kill it), then, once the child is gone, its exit code
and everything it wrote to a pipe of its own: a child killed mid-write never leaves half a
frame on the caller's pipe.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import math
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import wasmtime

from scriptpool.config.errors import InvalidModule, ModuleTooComplex, RegistryError, ScriptpoolError
from scriptpool.engine import compile_engine

_MIB = 1 << 20
BASE_SECONDS = 2.0
SECONDS_PER_MIB = 8.0
BASE_MEMORY_BYTES = 512 * _MIB
MEMORY_PER_MODULE_BYTE = 32
# How long the server may take to report a child it was told to kill.
_SERVER_GRACE_S = 10.0
# How long a server may take to start (a new one loads Python and wasmtime) and fork: not a bound
# on the compile, which runs from the fork, only on a server that stopped answering. A machine
# next to a CPU hog took more than 10 s.
_FORK_GRACE_S = 60.0

_REQUEST = struct.Struct("<QQQQ")  # stack bytes, memory bytes, CPU seconds, module length
_FRAME = struct.Struct("<Q")
_EXIT = struct.Struct("<i")
_PID = struct.Struct("<q")
_STATS = struct.Struct("<dQ")  # compile seconds, peak resident bytes
# What the child writes, in order: ready (its limits set, its engine made), then one outcome.
_READY, _ARTIFACT, _ERROR, _MEMORY = b"R", b"A", b"E", b"M"
_FORKED, _DONE = b"P", b"D"


@dataclass(frozen=True, slots=True)
class Bounds:
    """How long a compile may take (wall clock, from the child's fork) and how much address
    space the child may map."""

    seconds: float
    memory_bytes: int

    @classmethod
    def for_size(cls, size: int) -> Bounds:
        """The bounds of a module of ``size`` bytes."""
        seconds = BASE_SECONDS + SECONDS_PER_MIB * size / _MIB
        return cls(seconds, BASE_MEMORY_BYTES + MEMORY_PER_MODULE_BYTE * size)


@dataclass(frozen=True, slots=True)
class Compiled:
    """A compile's serialized artifact, with what it cost the child."""

    artifact: bytes
    seconds: float  # the compile alone, in the child
    peak_rss_bytes: int  # the child's peak resident memory


def compile_bounded(wasm: bytes, stack_bytes: int, bounds: Bounds | None = None) -> Compiled:
    """Compile ``wasm`` for an engine of ``stack_bytes`` in a bounded child process and return
    its artifact. Raises :class:`ModuleTooComplex` past a bound, :class:`InvalidModule` for a
    module wasmtime refuses, and :class:`RegistryError` if no child could compile it."""
    bounds = bounds or Bounds.for_size(len(wasm))
    cpu_seconds = math.ceil(bounds.seconds) + 1
    with _server_lock:
        server = _server()
        try:
            return server.compile(wasm, stack_bytes, bounds, cpu_seconds)
        except ScriptpoolError:
            raise  # a whole answer was read: the server is ready for the next request
        except (OSError, _ServerGone) as exc:
            server.close()
            raise RegistryError(f"the compile server failed: {exc}") from None
        except BaseException:
            server.close()  # interrupted mid-answer: its pipe may hold half a frame
            raise


class _ServerGone(Exception):
    """The compile server closed its pipe or stopped answering."""


class _Server:
    """The caller's side of one compile server process."""

    def __init__(self) -> None:
        # The caller's import path, led by the folder that holds the scriptpool namespace (an
        # editable install finds it through a site hook, and -S runs no site), so that the server
        # imports this code whatever put it there. This file is loaded by its path: importing it
        # as scriptpool.registry._bounded_compile would first import the whole registry package
        # (jsonschema and all), which the server never uses. abspath, not realpath: in a checkout
        # scriptpool/registry is a link to registry/, and the namespace is the link's side.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        name, path = json.dumps("_scriptpool_compile_server"), json.dumps(__file__)
        code = (
            f"import sys, importlib.util; sys.path[:] = {json.dumps([root, *sys.path])}; "
            f"spec = importlib.util.spec_from_file_location({name}, {path}); "
            "server = importlib.util.module_from_spec(spec); sys.modules[spec.name] = server; "
            "spec.loader.exec_module(server); server.serve()"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-S", "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.owner = os.getpid()
        assert self.process.stdin is not None and self.process.stdout is not None
        self.requests = self.process.stdin
        self.answers = self.process.stdout.fileno()

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.process.poll() is None

    def compile(self, wasm: bytes, stack_bytes: int, bounds: Bounds, cpu_seconds: int) -> Compiled:
        self.requests.write(_REQUEST.pack(stack_bytes, bounds.memory_bytes, cpu_seconds, len(wasm)))
        self.requests.write(wasm)
        self.requests.flush()
        asked = time.monotonic()
        forked = self.frame(asked + _FORK_GRACE_S + len(wasm) / _MIB)
        if forked is None:
            state = "running" if self.process.poll() is None else f"gone ({self.process.returncode})"
            raise _ServerGone(f"no child was forked in {time.monotonic() - asked:.1f} s (server {state})")
        if forked[:1] != _FORKED:
            raise _ServerGone(f"the server answered {forked[:1]!r} where a fork was due")
        started = time.monotonic()
        (pid,) = _PID.unpack_from(forked, 1)
        done = self.frame(started + bounds.seconds)
        peak: int | None = None
        if done is None:  # out of time: stop the child, then hear the server report it
            peak = _peak_rss(pid)
            with contextlib.suppress(ProcessLookupError):  # it ended just now
                os.kill(pid, signal.SIGKILL)
            done = self.frame(time.monotonic() + _SERVER_GRACE_S)
            if done is None or done[:1] != _DONE:
                raise _ServerGone("the server did not report the child it was told to kill")
            (code,) = _EXIT.unpack_from(done, 1)
            if code == -signal.SIGKILL:
                raise _too_complex("time", bounds, peak, time.monotonic() - started)
        if done[:1] != _DONE:
            raise _ServerGone("unexpected answer")
        (code,) = _EXIT.unpack_from(done, 1)
        return _outcome(code, done[1 + _EXIT.size :], bounds, time.monotonic() - started)

    def frame(self, deadline: float) -> bytes | None:
        """The server's next frame, or None when ``deadline`` passes first."""
        header = self.read(_FRAME.size, deadline)
        if header is None:
            return None
        (length,) = _FRAME.unpack(header)
        # The frame is on its way: the server writes it whole once its child is gone.
        body = self.read(length, time.monotonic() + _SERVER_GRACE_S + length / _MIB)
        if body is None:
            raise _ServerGone("a frame stopped half-way")
        return body

    def read(self, n: int, deadline: float) -> bytes | None:
        chunks = bytearray()
        while len(chunks) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                if chunks:  # never give up inside a frame header: the rest is coming
                    raise _ServerGone("a frame header stopped half-way")
                return None
            ready, _, _ = select.select([self.answers], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.answers, min(n - len(chunks), 1 << 20))
            if not chunk:
                raise _ServerGone("the server exited")
            chunks += chunk
        return bytes(chunks)

    def close(self) -> None:
        if self.owner != os.getpid():
            return  # a forked copy of the process that started it: not ours to stop
        self.process.kill()
        self.process.wait()
        self.requests.close()
        if self.process.stdout is not None:
            self.process.stdout.close()


_server_lock = threading.Lock()
_current: _Server | None = None


def start_compile_server() -> None:
    """Start this process's compile server now, if it is not running, without waiting for it:
    it loads while the caller reads and checks what it will compile. The bounds are the same."""
    with _server_lock:
        _server()


def _server() -> _Server:
    """The compile server of this process, started (again) if it is not running."""
    global _current
    if _current is None or not _current.alive():
        if _current is not None:
            _current.close()
        else:
            atexit.register(_stop_server)  # once: the server ends with its process, reaped
        _current = _Server()
    return _current


def _stop_server() -> None:
    with contextlib.suppress(Exception):
        if _current is not None:
            _current.close()


def _outcome(code: int, output: bytes, bounds: Bounds, took: float) -> Compiled:
    """What the child's exit code and output mean."""
    if output[:1] != _READY:
        raise RegistryError(f"the compile process failed to start (exit code {code})")
    kind, payload = output[1:2], output[2:]
    if kind == _ARTIFACT and code == 0:
        seconds, peak = _STATS.unpack_from(payload)
        return Compiled(payload[_STATS.size :], seconds, peak)
    if kind == _ERROR and code == 0:
        raise InvalidModule(f"module does not compile: {payload.decode(errors='replace')}")
    if kind == _MEMORY:
        raise _too_complex("memory", bounds, None, took)
    # It died compiling: the kernel stopped it at a bound, or the compiler failed on this module.
    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        raise _too_complex("time", bounds, None, took)
    error = _too_complex("memory", bounds, None, took)
    if code != -signal.SIGABRT:  # how a Rust allocation failure ends a process
        error.detail["exit_code"] = code
    raise error


def _too_complex(bound: str, bounds: Bounds, peak: int | None, took: float) -> ModuleTooComplex:
    if bound == "time":
        message = f"compiling the module took longer than its bound of {bounds.seconds:.1f} s"
        cap: float = round(bounds.seconds, 1)
    else:
        limit = bounds.memory_bytes // _MIB
        message = f"compiling the module needed more memory than its bound of {limit} MiB"
        cap = bounds.memory_bytes
    detail: dict[str, Any] = {"bound": bound, "cap": cap, "seconds": round(took, 2)}
    if peak is not None:
        detail["peak_rss_bytes"] = peak
    return ModuleTooComplex(message, **detail)


def _peak_rss(pid: int) -> int | None:
    """A live process's peak resident memory (Linux), None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- the server and its children -----------------------------------------------------------------


def serve() -> None:
    """The compile server's loop: read a request, fork a child to compile it, report the child's
    pid, then its exit code and output. Ends when the caller closes its end."""
    _die_with(os.getppid())  # a caller gone (SIGKILLed, say) takes its server with it
    requests = os.dup(0)
    answers = os.dup(1)
    # Anything printed by mistake goes to stderr, never into the answers.
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller's Ctrl-C is the caller's to handle
    while True:
        header = _read_all(requests, _REQUEST.size)
        if header is None:
            return
        stack_bytes, memory_bytes, cpu_seconds, length = _REQUEST.unpack(header)
        wasm = _read_all(requests, length)
        if wasm is None:
            return
        output_r, output_w = os.pipe()
        server = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _die_with(server)  # and a server gone takes its compile with it
                os.close(output_r)
                os.close(requests)
                os.close(answers)
                _compile_child(output_w, wasm, stack_bytes, memory_bytes, cpu_seconds)
                code = 0
            except BaseException:
                traceback.print_exc()  # to the caller's stderr: why no compile happened
            finally:
                os._exit(code)
        os.close(output_w)
        _write_frame(answers, _FORKED + _PID.pack(pid))
        output = bytearray()
        while chunk := os.read(output_r, 1 << 20):
            output += chunk
        os.close(output_r)
        _, status = os.waitpid(pid, 0)
        _write_frame(answers, _DONE + _EXIT.pack(os.waitstatus_to_exitcode(status)) + output)


_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` ends (Linux), and end now if it
    already has: an orphaned compile would otherwise run on to its CPU limit."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _compile_child(out: int, wasm: bytes, stack_bytes: int, memory_bytes: int, cpu_seconds: int) -> None:
    """In the forked child: set the bounds, compile, write the outcome to ``out``."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort past the memory bound dumps nothing
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # Past the memory bound Rust prints one line and aborts; a backtrace would only be noise.
    os.environ["RUST_BACKTRACE"] = "0"
    engine = compile_engine(stack_bytes)
    _write(out, _READY)
    started = time.perf_counter()
    try:
        artifact = bytes(wasmtime.Module(engine, wasm).serialize())
    except MemoryError:
        _write(out, _MEMORY)
        return
    except wasmtime.WasmtimeError as exc:
        _write(out, _ERROR + _one_line(exc).encode())
        return
    stats = _STATS.pack(time.perf_counter() - started, _peak_rss(os.getpid()) or 0)
    _write(out, _ARTIFACT + stats)
    _write(out, artifact)


def _one_line(exc: Exception) -> str:
    """wasmtime's messages span lines ("Caused by:" chains); errors we report are one line."""
    parts = [line.strip() for line in str(exc).splitlines()]
    return ": ".join(p for p in parts if p and p != "Caused by:")


def _read_all(fd: int, n: int) -> bytes | None:
    """Exactly ``n`` bytes from ``fd``, or None at end of file."""
    chunks = bytearray()
    while len(chunks) < n:
        chunk = os.read(fd, min(n - len(chunks), 1 << 20))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_frame(fd: int, body: bytes) -> None:
    _write(fd, _FRAME.pack(len(body)) + body)
