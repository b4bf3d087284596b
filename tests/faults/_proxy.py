"""A small TCP proxy that stands between processes and Redis and misbehaves on request.

It can add latency to every chunk, black-hole traffic (hold it, as a partitioned network does;
TCP delivers it late when the partition heals), and count the Redis commands a client sends so a
test can kill the client just before its n-th command reaches Redis.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from scriptpool.testing import free_port

_CHUNK = 65536
FORWARD, DROP, FORWARD_THEN_CUT = "forward", "drop", "forward then cut"
HALF_THEN_CUT = "half then cut"  # forward the first half of the command's bytes, then cut


def split_commands(buffer: bytearray) -> list[bytes]:
    """Remove and return the complete RESP commands at the start of ``buffer``."""
    commands = []
    while True:
        end = _command_end(buffer)
        if end is None:
            return commands
        commands.append(bytes(buffer[:end]))
        del buffer[:end]


def _command_end(buffer: bytearray) -> int | None:
    if not buffer:
        return None
    if buffer[:1] != b"*":  # an inline command: one line
        line = buffer.find(b"\r\n")
        return None if line < 0 else line + 2
    header = buffer.find(b"\r\n")
    if header < 0:
        return None
    pos = header + 2
    for _ in range(int(buffer[1:header])):
        line = buffer.find(b"\r\n", pos)
        if line < 0:
            return None
        pos = line + 2 + int(buffer[pos + 1 : line]) + 2
        if pos > len(buffer):
            return None
    return pos


def command_name(command: bytes) -> str:
    """The command word of one RESP command, upper-cased."""
    if command[:1] != b"*":
        return command.split()[0].decode(errors="replace").upper()
    first = command.split(b"\r\n")[2]
    return first.decode(errors="replace").upper()


class FaultProxy:
    """Listens on a free loopback port and forwards each connection to ``127.0.0.1:target_port``.

    ``before_command(n, name)`` (optional) is called before the n-th client command (counted over
    all connections) is forwarded, and says what to do with it: ``FORWARD`` it, ``DROP`` it and
    the connection, or ``FORWARD_THEN_CUT``: let Redis run it, then cut the connection so the
    client never sees the reply. ``inspect(n, command)`` (optional, instead) gets the command's
    bytes and may also say ``HALF_THEN_CUT``: Redis gets only part of the command.
    """

    def __init__(
        self,
        target_port: int,
        *,
        before_command: Callable[[int, str], str] | None = None,
        inspect: Callable[[int, bytes], str] | None = None,
        port: int | None = None,
    ) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.latency_s = 0.0
        self.commands = 0
        self._before_command = before_command
        self._inspect = inspect
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # -- faults --------------------------------------------------------------------------------
    def add_latency(self, seconds: float) -> None:
        """Delay every chunk, in both directions, by ``seconds``."""
        self.latency_s = seconds

    def black_hole(self) -> None:
        """Stop forwarding: connections stay open, nothing gets through until :meth:`heal`."""
        self._flowing.clear()

    def heal(self) -> None:
        """Forward normally again, delivering what was held."""
        self.latency_s = 0.0
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                _close(sock)

    # -- plumbing ------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                upstream.settimeout(None)
            except OSError:
                _close(downstream)
                continue
            for sock in (downstream, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [downstream, upstream]
            replies_cut = threading.Event()
            threading.Thread(
                target=self._pump_commands, args=(downstream, upstream, replies_cut), daemon=True
            ).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, replies_cut), daemon=True).start()

    def _forward(self, data: bytes, dst: socket.socket) -> None:
        self._flowing.wait()
        if self.latency_s:
            time.sleep(self.latency_s)
        self._flowing.wait()
        dst.sendall(data)

    def _pump(self, src: socket.socket, dst: socket.socket, cut: threading.Event) -> None:
        try:
            while (data := src.recv(_CHUNK)) and not cut.is_set():
                self._forward(data, dst)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)

    def _pump_commands(self, src: socket.socket, dst: socket.socket, replies_cut: threading.Event) -> None:
        buffer = bytearray()
        try:
            while data := src.recv(_CHUNK):
                if self._before_command is None and self._inspect is None:
                    self._forward(data, dst)
                    continue
                buffer += data
                for command in split_commands(buffer):
                    with self._lock:
                        self.commands += 1
                        number = self.commands
                    if self._inspect is not None:
                        verdict = self._inspect(number, command)
                    else:
                        assert self._before_command is not None
                        verdict = self._before_command(number, command_name(command))
                    if verdict == DROP:
                        return
                    if verdict == HALF_THEN_CUT:
                        self._forward(command[: len(command) // 2], dst)
                        time.sleep(0.05)  # Redis has read the half before the connection closes
                        return
                    if verdict == FORWARD_THEN_CUT:
                        replies_cut.set()
                    self._forward(command, dst)
                    if verdict == FORWARD_THEN_CUT:
                        time.sleep(0.05)  # Redis reads and runs it before the connection closes
                        return
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class ProxyProcess:
    """A :class:`FaultProxy` in a process of its own, steered from the test.

    Under load the proxy's threads would otherwise compete with the callers for the test
    process's GIL, and delay them in a way a real network does not.
    """

    def __init__(self, target_port: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.port = free_port()
        self._latency = context.Value("d", 0.0)
        self._flowing = context.Event()
        self._flowing.set()
        self._ready = context.Event()
        self._process = context.Process(
            target=_serve,
            args=(target_port, self.port, self._latency, self._flowing, self._ready),
            daemon=True,
        )
        self._process.start()
        if not self._ready.wait(30):
            raise RuntimeError("proxy process did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def add_latency(self, seconds: float) -> None:
        self._latency.value = seconds

    def black_hole(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self._latency.value = 0.0
        self._flowing.set()

    def close(self) -> None:
        self._process.kill()
        self._process.join(10)


def _serve(target_port: int, port: int, latency: Any, flowing: Any, ready: Any) -> None:
    proxy = FaultProxy(target_port, port=port)
    ready.set()
    while True:  # mirror the shared controls; the parent kills this process when done
        proxy.latency_s = latency.value
        if flowing.is_set():
            proxy._flowing.set()
        else:
            proxy._flowing.clear()
        time.sleep(0.005)
