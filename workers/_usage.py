"""Usage accounting on the worker: count each job's usage in memory on the job's thread, and
send the counts to Redis from a thread of their own every ``SCRIPTPOOL_USAGE_FLUSH_S``.

What is counted, per (shop, app, EP) and minute (``scriptpool.config.usage`` stores and reads
it): a call (a join's or chain's counts once per part, under the part's app), its status and
error code, the instructions it executed, its worker-side time (lookup, instantiate, run and
decode; a join's shared lookup is charged to no part) and the bytes its script read and wrote.

The job's thread never waits on Redis. A flush sends every count in one MULTI/EXEC, so Redis
has all of a flush or none of it (but for commands it refuses inside the transaction: a key of
the wrong type); a flush that fails keeps its counts for the next one (at most ``max_pending``
(shop, app, EP, minute) entries wait: past that, new entries are given up, counted in
:attr:`UsageRecorder.lost_calls` and logged the first time). A connection lost while Redis
applies a flush cannot be told from one lost before: that flush is sent again, and counted
twice. A clean stop flushes; a SIGKILL loses what was counted since the last flush, at most
``flush_s`` of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis

from scriptpool.config import Keys, Settings, get_logger
from scriptpool.config.usage import (
    BYTES_IN,
    BYTES_OUT,
    CALLS,
    EXEC_US,
    INSTRUCTIONS,
    STATUS_DROPPED,
    STATUS_REFUSED,
    UNKNOWN_APP,
    countable,
    error_metric,
    status_metric,
    usage_field,
)
from scriptpool.config.wire import Execution, ExecutionReport, Job
from scriptpool.registry import DEFAULT_APP

log = get_logger("worker")

# (shop, app, EP, minute): each is one set of hash fields in one minute's hash.
Entry = tuple[str, str, str, int]
# How many entries may wait for Redis: a minute of traffic from thousands of (shop, app, EP)
# pairs, a few MB; a longer outage loses the newest counts rather than the worker's memory.
MAX_PENDING = 50_000

# What a run cost, as the Prometheus totals take it: instructions, µs, bytes in, bytes out.
Costs = tuple[int, int, int, int]
_COST_METRICS = (INSTRUCTIONS, EXEC_US, BYTES_IN, BYTES_OUT)


class UsageRecorder:
    """Per-(shop, app, EP, minute) counters, thread-safe, sent to Redis by a daemon thread.

    ``count``, if given, gets each recorded job's summed costs (the worker's Prometheus totals,
    which so equal the sum of ``usage`` over every shop). ``clock`` gives Unix time.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        retention_s: int,
        flush_s: float,
        *,
        count: Callable[[Costs], None] | None = None,
        clock: Callable[[], float] = time.time,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._retention_s = retention_s
        self._flush_s = flush_s
        self._count = count
        self._clock = clock
        self._max_pending = max_pending
        self._pending: dict[Entry, dict[str, int]] = {}
        self._lock = threading.Lock()  # guards _pending
        self._flushing = threading.Lock()  # one flush at a time: the thread's, or close()'s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._refusing = False  # logged once while Redis refuses some commands
        self.lost_calls = 0  # calls whose counts were given up (Redis away too long)

    @classmethod
    def of(
        cls, client: redis.Redis, settings: Settings, *, count: Callable[[Costs], None] | None = None
    ) -> UsageRecorder:
        """A recorder on ``client`` (the worker's group's Redis) as ``settings`` configure it."""
        return cls(client, settings.keys, settings.usage_retention_s, settings.usage_flush_s, count=count)

    def start(self) -> UsageRecorder:
        """Start the flushing thread."""
        self._thread = threading.Thread(target=self._loop, name="usage-flush", daemon=True)
        self._thread.start()
        return self

    def record(self, job: Job, execution: Execution) -> None:
        """Count a job that ran: one entry per part of a join or chain, else its script's."""
        if execution.parts:
            runs = [
                (part.app, part.status, part.error.code if part.error else "", part.report)
                for part in execution.parts
            ]
        else:
            code = execution.error.code if execution.error else ""
            report = execution.report
            # No app in the report: nothing was bound, and a single-script EP's app is the default.
            runs = [(report.app or DEFAULT_APP, execution.status, code, report)]
        if not countable(job.shop_id, job.ep):
            return
        minute = int(self._clock()) // 60
        summed = [0, 0, 0, 0]
        for app, status, code, report in runs:
            counts = {CALLS: 1, status_metric(status): 1}
            if code:
                counts[error_metric(code)] = 1
            for at, (name, value) in enumerate(zip(_COST_METRICS, _costs(report), strict=True)):
                summed[at] += value
                if value:
                    counts[name] = value
            self._add((job.shop_id, app, job.ep, minute), counts)
        if self._count is not None:
            self._count((summed[0], summed[1], summed[2], summed[3]))

    def record_refused(self, job: Job, code: str) -> None:
        """Count a job the worker refused without running it (a quota, say), with the error
        code it answered; its app is unknown (:data:`UNKNOWN_APP`)."""
        self._record_unrun(job, STATUS_REFUSED, code)

    def record_failed(self, job: Job, code: str) -> None:
        """Count a job the worker itself failed on (not the script: ``worker_error``, say), with
        the code it answered; its app is unknown."""
        self._record_unrun(job, "error", code)

    def record_dropped(self, job: Job) -> None:
        """Count a job dropped unrun because its caller had given up (its app is unknown)."""
        self._record_unrun(job, STATUS_DROPPED, "")

    def flush(self) -> bool:
        """Send every count now, in one transaction; False (the counts kept for the next
        flush) if Redis did not take them."""
        with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return True
            try:
                self._send(batch)
            except redis.RedisError as exc:
                self._keep(batch)
                if not self._failing:
                    self._failing = True
                    log.warning("usage_flush_failed", error=str(exc)[:200], entries=len(batch))
                return False
            if self._failing:
                self._failing = False
                log.info("usage_flush_recovered", entries=len(batch))
            return True

    def close(self) -> None:
        """A clean stop: stop the thread and flush what is left."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self._flush_s * 2))
            self._thread = None
        self.flush()

    @property
    def pending(self) -> int:
        """Entries counted and not yet in Redis."""
        with self._lock:
            return len(self._pending)

    def _record_unrun(self, job: Job, status: str, code: str) -> None:
        if not countable(job.shop_id, job.ep):
            return
        counts = {CALLS: 1, status_metric(status): 1}
        if code:
            counts[error_metric(code)] = 1
        self._add((job.shop_id, UNKNOWN_APP, job.ep, int(self._clock()) // 60), counts)

    def _add(self, entry: Entry, counts: dict[str, int]) -> None:
        with self._lock:
            found = self._pending.get(entry)
            if found is None:
                if len(self._pending) >= self._max_pending:
                    self._lose(counts.get(CALLS, 0))
                    return
                self._pending[entry] = counts
                return
            for name, value in counts.items():
                found[name] = found.get(name, 0) + value

    def _keep(self, batch: dict[Entry, dict[str, int]]) -> None:
        """Put a failed flush's counts back, with whatever was counted meanwhile."""
        with self._lock:
            for entry, counts in batch.items():
                found = self._pending.get(entry)
                if found is not None:
                    for name, value in counts.items():
                        found[name] = found.get(name, 0) + value
                elif len(self._pending) < self._max_pending:
                    self._pending[entry] = counts
                else:
                    self._lose(counts.get(CALLS, 0))

    def _lose(self, calls: int) -> None:
        """Give up one entry's counts (the lock is held)."""
        if not self.lost_calls:
            log.error("usage_counts_dropped", max_pending=self._max_pending)
        self.lost_calls += max(calls, 1)

    def _send(self, batch: dict[Entry, dict[str, int]]) -> None:
        pipe = self._redis.pipeline(transaction=True)
        shops: dict[int, set[str]] = {}
        expiring: dict[str, int] = {}
        for (shop, app, ep, minute), counts in batch.items():
            key = self._keys.usage(shop, minute)
            for name, value in counts.items():
                pipe.hincrby(key, usage_field(app, ep, name), value)
            # A retention after its minute, whenever it is sent.
            expiring[key] = (minute + 1) * 60 + self._retention_s
            shops.setdefault(minute, set()).add(shop)
        for minute, members in shops.items():
            key = self._keys.usage_shops(minute)
            pipe.sadd(key, *members)
            expiring[key] = (minute + 1) * 60 + self._retention_s
        for key, at in expiring.items():
            pipe.expireat(key, at)
        # A lost connection raises, and so does a transaction Redis refused whole (EXECABORT): it
        # applied nothing, so the counts are sent again. A command refused inside the applied
        # transaction (a key of the wrong type: anyone can write Redis) is not: the rest of the
        # flush is there, and sending it again would count it twice.
        refused = [r for r in pipe.execute(raise_on_error=False) if isinstance(r, Exception)]
        if refused and not self._refusing:
            log.warning("usage_counts_refused", commands=len(refused), error=str(refused[0])[:200])
        self._refusing = bool(refused)

    def _loop(self) -> None:
        while not self._stopping.wait(self._flush_s):
            try:
                self.flush()
            except Exception as exc:  # a bug must not end the counting: log it, keep going
                log.error("usage_flush_crashed", error=repr(exc)[:200])


def _costs(report: ExecutionReport) -> Costs:
    """What one run cost: instructions, worker-side µs, bytes in and out (never negative)."""
    stages_ms = report.lookup_ms + report.instantiate_ms + report.run_ms + report.decode_ms
    return (
        max(0, report.instructions),
        max(0, round(stages_ms * 1000)),
        max(0, report.input_bytes),
        max(0, report.output_bytes),
    )
