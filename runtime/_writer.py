"""The worker's capture thread: after a call's reply has gone out, the runs worth keeping (every
failed script run, and a sampled share of successful ones: the EP's ``capture_rate``) become
records (:class:`CapturedRun`) that the thread writes to the store (``scriptpool.runtime._capture``).

Writing is the job of one daemon thread per worker (:class:`CaptureWriter`): the task hands it
what the run already holds and goes on to its next job, so capture adds nothing to any caller's
wait but the time the thread takes the GIL. What waits for the thread is bounded in bytes; past
that, captures are dropped and counted. The counting is the caller's (``count``): the workers
layer passes its Prometheus counter, so this layer imports no metrics library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from scriptpool.config import Limits, Settings, get_logger
from scriptpool.config.redis import redis_pool
from scriptpool.config.wire import ErrorInfo, Job, redis_command
from scriptpool.engine import engine_fingerprint
from scriptpool.runtime._capture import WRITE_SCRIPT, CaptureStore
from scriptpool.runtime._captured import CapturedRun
from scriptpool.runtime._script import ScriptTrace

log = get_logger("worker")

# What a writer counts, each with how many runs: written, dropped (past the pending bound),
# too_large (past the byte cap alone), failed (Redis down, a bug).
WRITTEN, DROPPED, TOO_LARGE, FAILED = "written", "dropped", "too_large", "failed"
CAPTURE_RESULTS = (WRITTEN, DROPPED, TOO_LARGE, FAILED)

_LIMIT_NAMES = tuple(field.name for field in dataclasses.fields(Limits))
# Inputs, outputs and logs waiting for the writer thread, at most (beyond: dropped, counted).
MAX_PENDING_BYTES = 32 * 1024 * 1024
# A failing writer logs once per this many seconds, not once per run.
_WARN_EVERY_S = 10.0


def _uncounted(result: str, runs: int) -> None:
    """The default ``count``: nothing is counted (a writer outside a worker)."""


def captured_run(
    trace: ScriptTrace, *, job_id: str, worker: str, engine: str, now: float, session: bool = False
) -> CapturedRun:
    """The record of one traced script run (``session``: whether its call had one)."""
    deployment, outcome = trace.deployment, trace.outcome
    run = outcome.run if outcome is not None else None
    return CapturedRun(
        id=os.urandom(8).hex(),
        captured_at=now,
        ep=deployment.ep,
        shop_id=deployment.shop_id,
        app=deployment.app,
        version=deployment.version,
        sha256=deployment.sha256,
        export=deployment.export,
        codec=deployment.codec,
        providers=tuple(deployment.providers),
        part=trace.part,
        input=trace.input,
        limits={name: getattr(trace.limits, name) for name in _LIMIT_NAMES},  # asdict is slow
        scale_factor=trace.report.scale_factor,
        ok=trace.ok,
        error=ErrorInfo.from_exception(trace.error) if trace.error is not None else None,
        stdout=run.stdout if run is not None else b"",
        report=trace.report,
        job_id=job_id,
        worker=worker,
        engine=engine,
        session=session,
    )


class CaptureWriter:
    """The worker's capture thread: :meth:`offer` (on the task's thread, after the reply) picks
    the runs to keep and queues them; the thread writes them. ``count(result, runs)`` is told
    how each run ended, one of :data:`CAPTURE_RESULTS` (from either thread: it must be
    thread-safe, as a Prometheus counter is)."""

    def __init__(
        self,
        settings: Settings,
        *,
        client: redis.Redis | None = None,
        sample: Callable[[], float] = random.random,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        count: Callable[[str, int], None] = _uncounted,
    ) -> None:
        from scriptpool.config.redis import redis_client

        self._store = CaptureStore(
            client or redis_client(settings.redis_url, timeout=2, connect_timeout=1), settings
        )
        self._sender = _ScriptSender(settings.redis_url, WRITE_SCRIPT)
        self._sample = sample
        self._count = count
        self._engine = engine_fingerprint()
        self._max_pending = max_pending_bytes
        self._pending = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Job, list[ScriptTrace], str, float, int] | None] = (
            queue.SimpleQueue()
        )
        self._warned_at = 0.0
        self._thread = threading.Thread(target=self._run, name="scriptpool-capture", daemon=True)
        self._thread.start()

    def offer(self, job: Job, traces: list[ScriptTrace], worker: str) -> None:
        """Queue the runs of one job worth keeping: the failed ones, and a sampled share of the
        successful ones. Never blocks and never raises."""
        chosen = [t for t in traces if not t.ok or (t.capture_rate > 0 and self._sample() < t.capture_rate)]
        if not chosen:
            return
        size = sum(len(t.input) + _stdout_bytes(t) + len(t.report.logs) for t in chosen)
        with self._lock:
            if self._pending + size > self._max_pending:
                self._count(DROPPED, len(chosen))
                return
            self._pending += size
        self._queue.put((job, chosen, worker, time.time(), size))

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (for at most ``timeout`` seconds), then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            job, traces, worker, now, size = item
            try:
                for trace in traces:
                    self._write(
                        captured_run(
                            trace,
                            job_id=job.id,
                            worker=worker,
                            engine=self._engine,
                            now=now,
                            session=job.session is not None,
                        )
                    )
            finally:
                with self._lock:
                    self._pending -= size

    def _write(self, run: CapturedRun) -> None:
        try:
            command = self._store.write_command(run)
            evicted = None if command is None else self._sender.call(*command)
        except Exception as exc:  # Redis down, a bug: the run is lost, the worker carries on
            self._count(FAILED, 1)
            if time.monotonic() - self._warned_at > _WARN_EVERY_S:
                self._warned_at = time.monotonic()
                log.warning("capture_failed", run=run.id, ep=run.ep, shop=run.shop_id, error=repr(exc))
            return
        if evicted is None:
            self._count(TOO_LARGE, 1)
            log.info("capture_too_large", run=run.id, ep=run.ep, shop=run.shop_id, input_bytes=len(run.input))
            return
        self._count(WRITTEN, 1)


class _ScriptSender:
    """Runs one Lua script by its SHA1 on a pooled connection, as one packed command.

    redis-py's ``Script`` call packs and encodes each argument in Python, about 100 µs of CPU
    for a capture's ten, which the capture thread would take from the worker's next call (the
    GIL); ``redis_command`` packs them in a few µs, as the reply path does. A server that does
    not know the script yet (NOSCRIPT: restarted, or flushed) is sent it once, then the call
    again."""

    def __init__(self, url: str, script: str) -> None:
        self._pool = redis_pool(url, timeout=2, connect_timeout=1)
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script).hexdigest().encode()

    def call(self, keys: list[str], args: list[bytes | str | int]) -> int:
        words = [a if isinstance(a, (bytes, str)) else str(a) for a in args]
        command = redis_command(b"EVALSHA", self._sha, str(len(keys)), *keys, *words)
        try:
            return int(self._send(command))
        except redis.exceptions.NoScriptError:
            self._send(redis_command(b"SCRIPT", b"LOAD", self._script))
            return int(self._send(command))

    def _send(self, command: bytes) -> Any:
        connection: Any = self._pool.get_connection()  # redis-py types its connections partly
        try:
            connection.send_packed_command([command], check_health=False)
            answer = connection.read_response()
        except redis.ResponseError:
            self._pool.release(connection)  # a whole answer was read: the connection is sound
            raise
        except BaseException:
            connection.disconnect()  # half-read answers must not reach the next user
            self._pool.release(connection)
            raise
        self._pool.release(connection)
        return answer


def _stdout_bytes(trace: ScriptTrace) -> int:
    outcome = trace.outcome
    return len(outcome.run.stdout) if outcome is not None and outcome.run is not None else 0
