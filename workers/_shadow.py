"""Shadow runs, as the worker sees them: after a live reply has gone, a call that belongs to a
rollout is handed to the worker's shadow process (``scriptpool.workers._shadow_process``), which runs the
candidate on the same input at idle priority and reports to the registry (``scriptpool.runtime._judge``).

The caller waits for none of it, and the worker gives it next to nothing: handing over is one
non-blocking send of one message on a Unix socket pair, on the job's own thread, with no other
thread woken. The socket's buffer is the bound: when the shadow process falls behind (a slow
candidate, a busy machine), the send fails at once and the sample is dropped and counted, never
queued without end. A reader thread takes the shadow process's results (counts, about once a
second) and log records into the worker's metrics and log. The process starts with the first
rollout call, and is started again, at most every few seconds, if it dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack
from prometheus_client import Counter

from scriptpool.config import Settings, get_logger
from scriptpool.config.wire import Execution
from scriptpool.registry import CANDIDATE_ERROR, MATCH, MISMATCH
from scriptpool.runtime import JUDGED, Sample
from scriptpool.workers._shadow_process import MESSAGE_BYTES, RECORD_FIELDS

log = get_logger("worker")

COMPARISONS = Counter(
    "scriptpool_shadow_comparisons",
    "Shadow runs of rollout candidates, by what the comparison found (dropped: not run, the "
    "shadow process was behind)",
    ["result"],
)
_RESULTS = {name: COMPARISONS.labels(name) for name in (MATCH, MISMATCH, CANDIDATE_ERROR, "dropped")}
# Samples in flight to the shadow process, at most (the kernel doubles it; an input is at most
# 128 KiB by default). A call whose sample is over MESSAGE_BYTES is not judged (counted dropped).
BUFFER_BYTES = 4 * 1024 * 1024
RESTART_AFTER_S = 5.0


class ShadowRunner:
    """Hands calls of a rollout to the shadow process, starting it when first needed."""

    def __init__(self, settings: Settings) -> None:
        self._env = {**os.environ, **settings.to_env()}
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = -RESTART_AFTER_S
        self._stopped = False

    def offer(
        self,
        ep: str,
        shop: str,
        payload: bytes,
        live: Execution,
        session: str | None = None,
        trace: dict[str, str] | None = None,
    ) -> None:
        """Hand over a call just answered. Costs nothing when no rollout is under way there.
        ``trace``: the live job's span context, which the shadow run's span links to."""
        if live.report.rollout not in JUDGED or self._stopped:
            return
        channel = self._socket or self._start()
        if channel is None:
            _RESULTS["dropped"].inc()
            return
        try:
            message = Sample(ep, shop, payload, live, session, trace).pack()
        except (TypeError, ValueError, OverflowError):  # as the reply: what the wire cannot carry
            _RESULTS["dropped"].inc()
            return
        if len(message) > MESSAGE_BYTES:
            _RESULTS["dropped"].inc()
            return
        try:
            # MSG_DONTWAIT: the reader thread's copy of this socket blocks, and shares its flags.
            channel.send(message, socket.MSG_DONTWAIT)
        except BlockingIOError:  # behind: this one is not judged
            _RESULTS["dropped"].inc()
        except OSError:  # the shadow process is gone: the reader starts over
            _RESULTS["dropped"].inc()

    def stop(self) -> None:
        """End the shadow process (samples not yet judged are dropped)."""
        self._stopped = True
        with self._lock:
            process, channel = self._process, self._socket
        if channel is not None:
            with contextlib.suppress(OSError):  # already gone
                channel.shutdown(socket.SHUT_RDWR)  # the shadow process reads its end
        if process is not None:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()

    def _start(self) -> socket.socket | None:
        with self._lock:
            if self._socket is not None:
                return self._socket
            if time.monotonic() - self._started_at < RESTART_AFTER_S:
                return None
            self._started_at = time.monotonic()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_BYTES)
            try:
                process = subprocess.Popen(
                    [sys.executable, "-m", "scriptpool.workers._shadow_process", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                )
            except OSError as exc:
                ours.close()
                log.error("shadow_process_failed_to_start", error=str(exc))
                return None
            finally:
                theirs.close()
            self._socket, self._process = ours, process
        threading.Thread(
            target=self._read, args=(ours, process), name="scriptpool-shadow", daemon=True
        ).start()
        return ours

    def _read(self, channel: socket.socket, process: subprocess.Popen[bytes]) -> None:
        reader = channel.dup()  # for this thread, blocking; the job's thread sends MSG_DONTWAIT
        try:
            while message := reader.recv(1 << 20):
                try:
                    _take(msgpack.unpackb(message, raw=False))
                except Exception as exc:  # the process runs untrusted code: its words are data
                    log.warning("shadow_message_refused", error=repr(exc)[:200])
        except OSError:
            pass
        finally:
            reader.close()
        code = process.wait()
        with self._lock:
            if self._socket is channel:
                self._socket, self._process = None, None
        channel.close()
        if not self._stopped:
            log.warning("shadow_process_exited", returncode=code)


def _take(message: Any) -> None:
    """One message from the shadow process: comparison counts, or a log record."""
    kind, body = message
    if kind == "counts":
        for result, n in body.items():
            if result in _RESULTS and type(n) is int and n > 0:
                _RESULTS[result].inc(n)
    elif kind == "log":
        level, name, event, fields = body
        extra = {str(k): v for k, v in fields.items() if k not in RECORD_FIELDS}
        logging.getLogger(str(name)).log(int(level), str(event), extra=extra)
