"""The shadow process: ``python -m scriptpool.workers._shadow_process FD``, started by a worker
(``scriptpool.workers._shadow``) the first time one of its calls belongs to a rollout; FD is its end of a
Unix socket pair.

It runs at the lowest CPU priority there is (``SCHED_IDLE``, else nice 19), so a shadow run gets
only CPU no live call wants, and it shares no lock with the worker: a looping candidate, or more
shadow work than the machine can afford, costs spare capacity and dropped samples, never a
caller's latency. It has an executor (the runtime's), a module cache and an invalidation listener of its own.

It reads one sample per message and sends back its log records as they happen and the counts
of its comparisons about once a second (the worker renders both: its log, its metrics). It ends
when the worker's end of the pair closes, which the kernel does when the worker dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import sys
import time
from collections import Counter
from typing import Any

import msgpack

JUDGE_FLUSH_S = 0.1  # what the judge has tallied reaches Redis about this often
COUNTS_FLUSH_S = 1.0  # and the worker's metrics
MESSAGE_BYTES = 2 * 1024 * 1024  # the largest sample the worker sends
# Log-record attributes of the record itself, not of the event.
RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _Forward(logging.Handler):
    """Sends each log record's level, logger, event and fields to the worker."""

    def __init__(self, channel: socket.socket) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        from scriptpool.config import event_name  # loaded by then: records come from the code that imports it

        fields = {k: _plain(v) for k, v in vars(record).items() if k not in RECORD_FIELDS}
        if record.exc_info:
            fields["exception"] = logging.Formatter().formatException(record.exc_info)
        message = msgpack.packb(("log", (record.levelno, record.name, event_name(record), fields)))
        with contextlib.suppress(OSError):  # the worker is gone
            self._channel.send(message)


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def lower_priority() -> str:
    """Run this process only on CPU nothing else wants; the policy it got."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "idle"
    except (AttributeError, OSError):
        os.nice(19)
        return "nice 19"


def main(argv: list[str]) -> int:
    channel = socket.socket(fileno=int(argv[1]))
    logging.getLogger().addHandler(_Forward(channel))
    logging.getLogger().setLevel(logging.INFO)
    priority = lower_priority()

    from scriptpool.config import Settings, get_logger
    from scriptpool.config.redis import InvalidationListener, redis_client
    from scriptpool.engine import Sandbox
    from scriptpool.registry import Registry
    from scriptpool.runtime import Executor, Sample, ShadowJudge, StoreCache

    log = get_logger("worker")
    settings = Settings.from_env()
    sandbox = Sandbox(settings.epoch_tick_ms)
    client = redis_client(settings.redis_url, timeout=2, connect_timeout=1)
    registry = Registry(client, settings, sandbox)
    # Candidates read script data as live scripts do, from a cache of this process's own.
    store = StoreCache(client, settings.keys, backstop_s=settings.binding_cache_ttl_s)
    executor = Executor(registry, sandbox, settings, store=store)
    listener = InvalidationListener(
        settings.redis_url,
        settings.keys.invalidations(),
        executor.invalidate,
        on_data=store.invalidate,
    )
    store.coherent = lambda: listener.subscribed
    listener.start().wait_subscribed(5)
    judge = ShadowJudge(executor, registry.rollouts)
    # Traces: this process's own SDK, as the worker's (the same variables); spans flushed at exit.
    from scriptpool.workers._tracing import for_process

    traced = for_process(settings)
    log.info("shadow_process_ready", pid=os.getpid(), priority=priority)

    counts: Counter[str] = Counter()
    reported = sent = time.monotonic()
    while True:
        # Idle for a moment: report the tallies; otherwise about every JUDGE_FLUSH_S.
        wait = JUDGE_FLUSH_S if judge.pending or counts else None
        if select.select([channel], [], [], wait)[0]:
            message = channel.recv(MESSAGE_BYTES)
            if not message:
                break
            sample = Sample.unpack(message)  # whole: the worker sends none larger
            started = time.time()
            try:
                result = judge.judge(sample)
            except Exception:  # a bug or Redis lost: this sample is dropped, the next one runs
                log.exception("shadow_run_failed", ep=sample.ep, shop=sample.shop)
                continue
            if traced is not None and sample.trace:
                traced.shadow(
                    sample.trace, sample.ep, sample.shop, started, time.time(), result or "not_judged"
                )
            if result is not None:
                counts[result] += 1
        else:
            reported = 0.0
        now = time.monotonic()
        if now - reported >= JUDGE_FLUSH_S:
            try:
                judge.flush()
            except Exception:
                log.exception("shadow_report_failed")
            reported = now
        if counts and now - sent >= COUNTS_FLUSH_S:
            try:
                channel.send(msgpack.packb(("counts", dict(counts))))
            except OSError:
                break
            counts.clear()
            sent = now
    listener.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
