"""What a worker process keeps: its runtime, caches, listener, heartbeat, quota gate, usage and
serving loop (``WorkerState``), and how one job is run or refused in it. One per process, made
on first use after any fork (:func:`worker_state`); the Celery task and the lifecycle handlers
that use it are ``scriptpool.workers._tasks``."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from scriptpool.config import Settings, get_logger
from scriptpool.config.errors import ConfigurationError, QuotaExceeded
from scriptpool.config.heartbeats import WorkerHeartbeat, live_workers
from scriptpool.config.redis import redis_client
from scriptpool.config.wire import ErrorInfo, Execution, Job, Reply
from scriptpool.workers import _telemetry as telemetry
from scriptpool.workers import _tracing as tracing
from scriptpool.workers._backend import ReplyPusher, ReplySession, failure_reply
from scriptpool.workers._serve import Server

if TYPE_CHECKING:
    from scriptpool.config.redis import InvalidationListener
    from scriptpool.runtime import AppWrites, CaptureWriter, Executor, ScriptTrace
    from scriptpool.workers._quotas import QuotaGate
    from scriptpool.workers._shadow import ShadowRunner
    from scriptpool.workers._writes import StoreWriter

log = get_logger("worker")


@dataclass
class WorkerCounters:
    """Per-process counters, reported in the heartbeat (Prometheus has its own)."""

    executed: int = 0
    dropped_stale: int = 0
    refused: int = 0  # quota_exceeded: over a quota or over the shop's fair share
    by_shard: dict[int, int] = field(default_factory=dict)  # jobs taken, run or dropped


class WorkerState:
    """What a worker process keeps hot: the runtime's executor, its caches, the invalidation listener."""

    def __init__(self, settings: Settings) -> None:
        from scriptpool.config.redis import InvalidationListener
        from scriptpool.engine import Sandbox
        from scriptpool.registry import Registry
        from scriptpool.runtime import CaptureWriter, Executor, StoreCache
        from scriptpool.workers._quotas import QuotaGate
        from scriptpool.workers._shadow import ShadowRunner
        from scriptpool.workers._usage import UsageRecorder
        from scriptpool.workers._writes import StoreWriter

        self.settings = settings
        self.pid = os.getpid()
        client = redis_client(settings.redis_url, timeout=2, connect_timeout=1)
        sandbox = Sandbox(settings.epoch_tick_ms)
        # Script data that input queries select, hot in this process (the shard group's Redis).
        store = StoreCache(client, settings.keys, backstop_s=settings.binding_cache_ttl_s)
        registry = Registry(client, settings, sandbox)
        self.executor: Executor = Executor(registry, sandbox, settings, store=store)
        self.shadows: ShadowRunner = ShadowRunner(settings)
        self.counters = WorkerCounters()
        self.listener: InvalidationListener = InvalidationListener(
            settings.redis_url,
            settings.keys.invalidations(),
            self.executor.invalidate,
            on_data=store.invalidate,
        ).start()
        store.coherent = lambda: self.listener.subscribed
        self.heartbeat: telemetry.Heartbeat | None = None
        self.replies = ReplyPusher(settings)
        # Runs each delivery's jobs, and what queues up behind them, fairly between shops.
        self.server = Server(
            self.replies, self.run_job, self.refuse, self.shares_shard, _stopping, _lingers_on
        )
        self._client = client
        # Other live workers per shard, as the last heartbeat read them.
        self._peers: dict[int, int] = {}
        # Scripts' storeWrites, applied on the job's thread right after its reply.
        self.store_writes: StoreWriter = StoreWriter(client, settings)
        # Failed and sampled runs, written by a thread of their own after the replies.
        self.capture: CaptureWriter | None = (
            CaptureWriter(settings, count=telemetry.record_captured) if settings.capture else None
        )
        # Quotas, on a client that does not retry: a quota's answer is worth nothing after the
        # job's deadline, and a Redis that does not answer lets jobs run (fail open). 1 s, not
        # less: a finish that times out leaves its slot taken until the job's deadline (seen
        # with 0.25 s on a machine running three test suites at once).
        quota_client = redis_client(settings.redis_url, timeout=1.0, connect_timeout=0.25, retry=False)
        self.quotas: QuotaGate = QuotaGate(quota_client, settings.keys)
        # Per-shop usage, counted on the job's thread and sent by a thread of its own.
        self.usage = UsageRecorder.of(client, settings, count=telemetry.record_usage).start()
        # Traces (scriptpool.workers._tracing): None unless configured; made after the reply.
        self.tracing: tracing.JobTracing | None = tracing.for_process(settings)

    def run_job(self, job: Job, replies: ReplySession, shard: int) -> float | None:
        """Run one job and push its reply; the log event and metrics come after the reply, so
        the caller does not wait for them. Returns the worker time it cost the shop, in seconds
        (what fair share charges it), or None if it did not run (stale, or over a quota)."""
        started = time.perf_counter()
        received = time.time()
        self.counters.by_shard[shard] = self.counters.by_shard.get(shard, 0) + 1
        if received > job.deadline:
            self._dropped(job, shard, received)
            return None
        try:
            refusal = self.quotas.admit(job.id, job.shop_id, lambda: self._apps(job), job.deadline)
        except Exception as exc:  # a bug in the gate: the call runs, as when Redis fails (fail open)
            log.error("quota_gate_failed", job=job.id, shop=job.shop_id, error=repr(exc)[:300])
            refusal = None
        if refusal is not None:
            self.refuse(job, refusal.error(), replies, shard, reason=refusal.limit)
            return None
        released = False

        def release(execution: Execution | None) -> None:
            # Before the reply: a caller that calls again the moment it has its answer must find
            # its slot free (a shop without quotas: no Redis call).
            nonlocal released
            if not released:
                released = True
                self.quotas.finish(job.id, job.shop_id, _instructions_by_app(execution))

        execution: Execution | None = None
        try:
            execution = self._execute(job, replies, shard, received, release)
        finally:
            release(execution)
        spent = time.perf_counter() - started
        if execution is None or execution.report.module_source in ("hot", ""):
            return spent
        # The module's first run in this process (it was deserialized or compiled): fair share
        # charges the shop the script's run alone. The load is the worker's own business, once
        # per module, and a shop whose first call loaded must not start a busy period in debt
        # for it (measured: a first run of 16 ms put a quiet shop behind sixteen of a flood's).
        report = execution.report
        return (report.instantiate_ms + report.run_ms + report.decode_ms) / 1000

    def _beat(self, name: str, shards: list[int]) -> WorkerHeartbeat:
        """What the heartbeat says of this worker, every few seconds; and, on the heartbeat's
        thread (never a job's), who else serves its shards now."""
        self._read_peers(name)
        return telemetry.describe_worker(
            name,
            shards,
            self.settings.shards,
            self.executor.cache_stats(),
            self.counters.executed,
            self.counters.dropped_stale,
            dict(self.counters.by_shard),
            self.executor.store.stats(),
        )

    def _read_peers(self, name: str) -> None:
        try:
            beats = live_workers(self._client, self.settings.keys)
        except (redis.RedisError, OSError):
            return  # what the last reading said stands
        if not any(beat.name == name for beat in beats):
            return  # our own beat is missing (Redis flushed, say): this reading is not whole
        counts: dict[int, int] = {}
        for beat in beats:
            if beat.name != name:
                for n in beat.shards:
                    counts[n] = counts.get(n, 0) + 1
        self._peers = counts

    def shares_shard(self, shard: int) -> bool:
        """Whether other processes take ``shard``'s messages too: this worker's pool runs
        several, or another live worker's heartbeat names the shard (read with each of this
        worker's heartbeats, so a peer that starts is seen within HEARTBEAT_S). A worker alone
        on its shard may look as far ahead in the queue as it likes; one that shares it must
        leave its peers work (``scriptpool.workers._serve``)."""
        return _pool_processes > 1 or self._peers.get(shard, 0) > 0

    def _apps(self, job: Job) -> tuple[str, ...]:
        """The apps a quota check counts ``job`` against; none if they cannot be read (an
        unknown EP, Redis lost): the run then fails as it would for a shop without quotas, with
        its own named error."""
        try:
            return self.executor.apps(job.ep, job.shop_id)
        except Exception:
            return ()

    def refuse(
        self, job: Job, error: QuotaExceeded, replies: ReplySession, shard: int, *, reason: str
    ) -> None:
        """Answer ``job`` with ``quota_exceeded`` without running it (its caller falls back at
        once), unless its caller has given up already; counted either way."""
        now = time.time()
        if now > job.deadline:
            self._dropped(job, shard, now)
            return
        info = ErrorInfo.from_exception(error)
        replies.push(Reply(job.id, None, info, shard, self.server.worker, now, now).to_wire())
        self.counters.refused += 1
        telemetry.record_refused(reason)
        self.usage.record_refused(job, QuotaExceeded.code)
        log.info("quota_refused", job=job.id, ep=job.ep, shop=job.shop_id, shard=shard, reason=reason)

    def _dropped(self, job: Job, shard: int, now: float) -> None:
        self.counters.dropped_stale += 1
        telemetry.record_dropped()
        self.usage.record_dropped(job)
        log.info(
            "stale_job_dropped",
            job=job.id,
            ep=job.ep,
            shop=job.shop_id,
            shard=shard,
            late_ms=round((now - job.deadline) * 1000, 3),
        )

    def _execute(
        self,
        job: Job,
        replies: ReplySession,
        shard: int,
        received: float,
        release: Callable[[Execution | None], None],
    ) -> Execution | None:
        """Run ``job`` and reply; then its writes, log line, metrics, capture and shadow run.
        None if the worker failed (the caller hears ``worker_error``)."""
        worker = self.server.worker
        traced = self.tracing
        begun = time.time() if traced is not None else 0.0
        trace: list[ScriptTrace] | None = [] if self.capture is not None else None
        writes: list[AppWrites] = []
        try:
            execution = self.executor.execute(
                job.ep,
                job.shop_id,
                job.input,
                deadline=job.deadline,
                trace=trace,
                queries=job.queries,
                session=job.session,
                writes=writes,
            )
        except Exception as exc:  # the worker failed (e.g. Redis lost mid-lookup), not the script
            log.warning("job_failed", job=job.id, ep=job.ep, shop=job.shop_id, error=repr(exc))
            reply = failure_reply(job.id, exc, self.server.request, shard)
            release(None)
            replies.push(reply)
            self.usage.record_failed(job, reply["error"]["code"])
            if traced is not None:
                now = time.time()
                traced.failed(
                    job, reply["error"]["code"], shard, worker, received=received, finished=now, pushed=now
                )
            return None
        finished = time.time()
        # A caller past its deadline has returned its fallback and stopped listening: a reply
        # would only recreate the reply list of a client that may be gone.
        replied = finished <= job.deadline
        release(execution)
        if replied:
            replies.push(Reply(job.id, execution, None, shard, worker, received, finished).to_wire())
        pushed = time.time() if traced is not None else finished
        if writes:  # a successful call's (the executor hands over none of a failed one)
            replies.send()  # the caller does not wait for the writes
            self.store_writes.apply(job, writes, replied=replied)
            # This process's next job reads them at once, not when its listener hears of them.
            self.executor.store.forget_written(job.shop_id, job.session, writes)
        self.counters.executed += 1
        self.usage.record(job, execution)
        telemetry.record_execution(
            execution, job=job.id, shop=job.shop_id, ep=job.ep, shard=shard, worker=worker
        )
        if trace and self.capture is not None:
            self.capture.offer(job, trace, worker)
        linked = None
        if traced is not None:  # the job's spans (nobody waits for them); its context for a shadow run
            linked = traced.executed(
                job, execution, shard, worker, received=received, begun=begun, finished=finished,
                pushed=pushed, replied=replied,
            )  # fmt: skip
        # A rollout's, after the reply.
        self.shadows.offer(job.ep, job.shop_id, job.input, execution, job.session, linked)
        return execution

    def announce(self, name: str, shards: list[int]) -> None:
        """Claim the worker's name and open its metrics port, or raise ConfigurationError; then
        start the heartbeat. Runs before the worker consumes anything."""
        if self.heartbeat is not None:
            return
        heartbeat = telemetry.Heartbeat(
            self.settings.redis_url,
            self.settings.keys.worker(name),
            lambda: self._beat(name, shards),
        )
        heartbeat.claim()
        try:
            telemetry.start_metrics_server(self.settings.metrics_port)
        except ConfigurationError:
            heartbeat.stop()
            raise
        self.heartbeat = heartbeat.start()

    def shutdown(self) -> None:
        """A clean stop: the heartbeat goes at once, so nobody counts this worker as live."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        self.listener.stop()
        if self.capture is not None:
            self.capture.close()
        self.shadows.stop()
        self.usage.close()  # last: a clean stop loses no counts


def _stopping() -> bool:
    """Whether Celery has been asked to stop this worker (its warm or cold shutdown)."""
    from celery.worker import state

    # A warm shutdown sets should_stop to the exit code, 0: "set" is "neither None nor False",
    # as Celery itself tests it, by identity (0 == False, so ``in (None, False)`` would miss it).
    return any(flag is not None and flag is not False for flag in (state.should_stop, state.should_terminate))


def _instructions_by_app(execution: Execution | None) -> dict[str, int]:
    """What each app's script of ``execution`` used (nothing, if the worker failed)."""
    if execution is None:
        return {}
    if execution.parts:
        return {part.app: part.report.instructions for part in execution.parts}
    return {execution.report.app or "default": execution.report.instructions}


_state: WorkerState | None = None
_state_lock = threading.Lock()
# Processes (or threads) of this worker that take jobs: a prefork child inherits the count.
_pool_processes = 1
# The queues a solo worker waits on itself (set before it consumes; None: it does not).
_linger_queues: dict[str, int] | None = None


def worker_state(settings: Settings) -> WorkerState:
    """This process's state, created on first use (after any fork)."""
    global _state
    if _state is None:
        with _state_lock:
            if _state is None:
                _state = WorkerState(settings)
    return _state


def inherited_state() -> WorkerState | None:
    """This process's state if it has one of its own; a prefork child's copy of its parent's
    (made without the parent's threads) is dropped, and None returned."""
    global _state
    if _state is not None and _state.pid != os.getpid():
        _state = None
    return _state


def set_pool_processes(count: int) -> None:
    """How many processes (or threads) of this worker take jobs (its pool's, 1 for solo)."""
    global _pool_processes
    _pool_processes = max(1, count)


def set_lingering(queues: dict[str, int] | None) -> None:
    """The queues this worker consumes (name to shard), which its loop waits on itself once
    nothing waits; None where it must not (a pool other than solo: ``scriptpool.workers._serve``)."""
    global _linger_queues
    _linger_queues = dict(queues) if queues is not None else None


def _lingers_on() -> dict[str, int] | None:
    return _linger_queues
