"""The one Celery task: run the jobs of a message on this process's runtime, dropping those whose
callers gave up, and reply to each as soon as it is done. Also the worker's lifecycle: logging,
its name and metrics port (claimed before it consumes anything) and its heartbeat."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import signals

from scriptpool.config import Keys, Settings, configure_logging, get_logger
from scriptpool.config.errors import ConfigurationError
from scriptpool.config.redis import redis_client
from scriptpool.config.wire import Job, Reply, Taken
from scriptpool.workers import _telemetry as telemetry
from scriptpool.workers._backend import ReplyPusher, ReplySession, failure_reply

if TYPE_CHECKING:
    from celery import Celery

    from scriptpool.config.redis import InvalidationListener
    from scriptpool.runtime import AppWrites, CaptureWriter, Executor, ScriptTrace
    from scriptpool.workers._shadow import ShadowRunner
    from scriptpool.workers._writes import StoreWriter

log = get_logger("worker")

# What a worker that cannot start as configured exits with (the CLI's "usage mistake" code).
EXIT_MISCONFIGURED = 2


@dataclass
class WorkerCounters:
    """Per-process counters, reported in the heartbeat (Prometheus has its own)."""

    executed: int = 0
    dropped_stale: int = 0
    by_shard: dict[int, int] = field(default_factory=dict)  # jobs taken, run or dropped


class WorkerState:
    """What a worker process keeps hot: the runtime's executor, its caches, the invalidation listener."""

    def __init__(self, settings: Settings) -> None:
        from scriptpool.config.redis import InvalidationListener
        from scriptpool.engine import Sandbox
        from scriptpool.registry import Registry
        from scriptpool.runtime import CaptureWriter, Executor, StoreCache
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
        # Scripts' storeWrites, applied on the job's thread right after its reply.
        self.store_writes: StoreWriter = StoreWriter(client, settings)
        # Failed and sampled runs, written by a thread of their own after the replies.
        self.capture: CaptureWriter | None = (
            CaptureWriter(settings, count=telemetry.record_captured) if settings.capture else None
        )
        # Per-shop usage, counted on the job's thread and sent by a thread of its own.
        self.usage = UsageRecorder.of(client, settings, count=telemetry.record_usage).start()

    def run_job(
        self, wire: dict[str, Any], replies: ReplySession, request: Any, shard: int, worker: str
    ) -> None:
        """Run one job and push its reply; the log event and metrics come after the reply, so
        the caller does not wait for them."""
        received = time.time()
        try:
            job = Job.from_wire(wire)
        except ValueError as exc:  # one bad job of a message: its own reply, and the rest run
            job_id = wire.get("id") if isinstance(wire, dict) else None
            log.warning("security_job_refused", shard=shard, job=str(job_id)[:64], problem=str(exc)[:200])
            if type(job_id) is str:
                replies.push(failure_reply(job_id, exc, request, shard))
            return
        self.counters.by_shard[shard] = self.counters.by_shard.get(shard, 0) + 1
        if received > job.deadline:
            self.counters.dropped_stale += 1
            telemetry.record_dropped()
            self.usage.record_dropped(job)
            log.info(
                "stale_job_dropped",
                job=job.id,
                ep=job.ep,
                shop=job.shop_id,
                shard=shard,
                late_ms=round((received - job.deadline) * 1000, 3),
            )
            return
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
            replies.push(failure_reply(job.id, exc, request, shard))
            return
        finished = time.time()
        # A caller past its deadline has returned its fallback and stopped listening: a reply
        # would only recreate the reply list of a client that may be gone.
        replied = finished <= job.deadline
        if replied:
            replies.push(Reply(job.id, execution, None, shard, worker, received, finished).to_wire())
        if writes:  # a successful call's (the executor hands over none of a failed one)
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
        # A rollout's, after the reply.
        self.shadows.offer(job.ep, job.shop_id, job.input, execution, job.session)

    def announce(self, name: str, shards: list[int]) -> None:
        """Claim the worker's name and open its metrics port, or raise ConfigurationError; then
        start the heartbeat. Runs before the worker consumes anything."""
        if self.heartbeat is not None:
            return
        heartbeat = telemetry.Heartbeat(
            self.settings.redis_url,
            self.settings.keys.worker(name),
            lambda: telemetry.describe_worker(
                name,
                shards,
                self.settings.shards,
                self.executor.cache_stats(),
                self.counters.executed,
                self.counters.dropped_stale,
                dict(self.counters.by_shard),
                self.executor.store.stats(),
            ),
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


_state: WorkerState | None = None
_state_lock = threading.Lock()


def worker_state(settings: Settings) -> WorkerState:
    """This process's state, created on first use (after any fork)."""
    global _state
    if _state is None:
        with _state_lock:
            if _state is None:
                _state = WorkerState(settings)
    return _state


def register(app: Celery) -> None:
    """Register the execute task and the worker lifecycle handlers."""

    # ignore_result: the task pushes its replies itself (scriptpool.workers._backend.ReplyPusher) and returns
    # None, so Celery neither reprs nor stores a result. Errors that escape it still reach the
    # caller through the backend (store_errors_even_if_ignored).
    @app.task(  # type: ignore[untyped-decorator]
        name=Keys.TASK,
        bind=True,
        ignore_result=True,
        store_errors_even_if_ignored=True,
        Strategy="scriptpool.workers._strategy:guarded",  # refuses malformed messages instead of dying
    )
    def execute(self: Any, *jobs: dict[str, Any], announce: bool = False) -> None:
        """Run each job of the message in order, replying to each as soon as it is done.

        A message carries one job, or several for the same shard that one client coalesced
        (``scriptpool.producer._batching``); each is dropped on its own if its caller has given up. With
        ``announce`` the client first hears that the message was taken, so it can publish the
        calls that piled up meanwhile while this worker is still busy.
        """
        state = worker_state(app.settings)
        request = self.request
        queue = (request.delivery_info or {}).get("routing_key") or ""
        shard = app.settings.keys.shard_of_queue(queue)
        worker = f"{request.hostname}:{os.getpid()}"
        with state.replies.session(request.reply_to) as replies:
            if announce and jobs:
                replies.push(Taken(jobs[0]["id"]).to_wire())
            for wire in jobs:
                state.run_job(wire, replies, request, -1 if shard is None else shard, worker)

    def setup_logging(loglevel: Any = None, logfile: str | None = None, **_: Any) -> None:
        # Celery then leaves logging alone: every line, Celery's own too, is one JSON object
        # (readable on a terminal), not JSON inside Celery's "[time: LEVEL/Process]" prefix.
        level = loglevel if isinstance(loglevel, int) else logging.getLevelName(loglevel or "INFO")
        configure_logging(level=level if isinstance(level, int) else logging.INFO, filename=logfile)
        # Our "execution" event is the one line per task; Celery's received/succeeded lines
        # would format every result again on the hot path.
        for name in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def choose_group(options: Any = None, **_: Any) -> None:
        """Before the worker is set up: it needs a usable artifact key, and its shards (``-Q``)
        must all be in one shard group, whose Redis it then uses for everything, its broker
        included; else it refuses to start.
        Logging is not configured yet, so the refusal is one line on stderr."""
        try:
            app.settings.require_artifact_key()  # no key, or one anyone could sign with: refuse
        except ConfigurationError as exc:
            print(f"scriptpool worker: {exc.code}: {exc.message}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_MISCONFIGURED) from None
        keys = app.settings.keys
        queues = (options or {}).get("queues") or []
        if isinstance(queues, str):
            queues = queues.split(",")
        named = [keys.shard_of_queue(q.strip()) for q in queues]
        shards = [n for n in named if n is not None] if queues else list(range(app.settings.shards))
        if not shards:
            return  # none of our queues: nothing to choose by
        try:
            app.use_group(app.settings.group_of_shards(shards))
        except ConfigurationError as exc:
            print(f"scriptpool worker: {exc.code}: {exc.message}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_MISCONFIGURED) from None

    def init(sender: Any = None, instance: Any = None, **_: Any) -> None:
        """After logging is set up and before consuming: claim the name and metrics port, or
        refuse to start (a SystemExit here is the worker's exit code)."""
        keys = app.settings.keys
        consumed = [keys.shard_of_queue(q) for q in app.amqp.queues.consume_from or app.amqp.queues]
        shards = sorted(n for n in consumed if n is not None)
        name = str(sender or getattr(instance, "hostname", None) or f"pid{os.getpid()}")
        try:
            worker_state(app.settings).announce(name, shards)
        except ConfigurationError as exc:
            log.error("worker_refused_to_start", reason=exc.message, worker=name)
            raise SystemExit(EXIT_MISCONFIGURED) from None

    def fresh_state_after_fork(**_: Any) -> None:
        # A prefork child inherits the parent's state without its threads (ticker, listener);
        # the solo pool sends this signal too, in the process that made the state.
        global _state
        if _state is not None and _state.pid != os.getpid():
            _state = None
        worker_state(app.settings)

    def shutdown(**_: Any) -> None:
        if _state is not None:
            _state.shutdown()

    signals.celeryd_init.connect(choose_group, weak=False)
    signals.setup_logging.connect(setup_logging, weak=False)
    signals.celeryd_after_setup.connect(init, weak=False)
    # Prefork children start here; solo and threads pools run in the main process.
    signals.worker_process_init.connect(fresh_state_after_fork, weak=False)
    signals.worker_shutdown.connect(shutdown, weak=False)
