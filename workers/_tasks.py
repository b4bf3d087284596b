"""The one Celery task: run the jobs of a message on this process's engine, dropping those whose
callers gave up, and reply to each as soon as it is done."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from celery import signals

from config import TASK_NAME, Job, Reply, Settings, configure_logging
from config._wire import Taken
from workers._backend import ReplyPusher, ReplySession, failure_reply

if TYPE_CHECKING:
    from celery import Celery

    from workers._executor import Executor
    from workers._invalidation import InvalidationListener

from workers import _telemetry as telemetry

log = structlog.get_logger("scriptpool.worker")


@dataclass
class WorkerCounters:
    """Per-process counters, reported in the heartbeat (Prometheus has its own)."""

    executed: int = 0
    dropped_stale: int = 0


class WorkerState:
    """Everything a worker process keeps hot: the engine, its caches, the invalidation listener."""

    def __init__(self, settings: Settings) -> None:
        import redis

        from registry import Registry
        from workers._executor import Executor
        from workers._invalidation import InvalidationListener
        from workers.sandbox import Sandbox

        self.settings = settings
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=1)
        sandbox = Sandbox(settings.epoch_tick_ms)
        self.executor: Executor = Executor(Registry(client, settings, sandbox), sandbox, settings)
        self.counters = WorkerCounters()
        self.listener: InvalidationListener = InvalidationListener(
            settings.redis_url, settings.keys.invalidations(), self.executor.invalidate
        ).start()
        self.heartbeat: telemetry.Heartbeat | None = None
        self.replies = ReplyPusher(settings)

    def run_job(
        self, wire: dict[str, Any], replies: ReplySession, request: Any, shard: int, worker: str
    ) -> None:
        """Run one job and push its reply; the log event and metrics come after the reply, so
        the caller does not wait for them."""
        received = time.time()
        job = Job.from_wire(wire)
        if received > job.deadline:
            self.counters.dropped_stale += 1
            telemetry.record_dropped()
            log.info(
                "stale_job_dropped",
                job=job.id,
                ep=job.ep,
                shop=job.shop_id,
                shard=shard,
                late_ms=round((received - job.deadline) * 1000, 3),
            )
            return
        try:
            execution = self.executor.execute(job.ep, job.shop_id, job.input)
        except Exception as exc:  # the worker failed (e.g. Redis lost mid-lookup), not the script
            log.warning("job_failed", job=job.id, ep=job.ep, shop=job.shop_id, error=repr(exc))
            replies.push(failure_reply(job.id, exc, request, shard))
            return
        reply = Reply(
            job_id=job.id,
            execution=execution.to_dict(),
            error=None,
            shard=shard,
            worker=worker,
            received_at=received,
            finished_at=time.time(),
        )
        replies.push(reply.to_wire())
        self.counters.executed += 1
        telemetry.record_execution(
            execution, job=job.id, shop=job.shop_id, ep=job.ep, shard=shard, worker=worker
        )

    def announce(self, name: str, shards: list[int]) -> None:
        """Start the heartbeat and metrics endpoint once the worker knows its name and shards."""
        if self.heartbeat is not None:
            return
        telemetry.start_metrics_server(self.settings.metrics_port)
        self.heartbeat = telemetry.Heartbeat(
            self.settings.redis_url,
            self.settings.keys.worker(name),
            lambda: telemetry.describe_worker(
                name, shards, self.executor.cache_stats(), self.counters.executed, self.counters.dropped_stale
            ),
        ).start()


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
    """Register the execute task and warm the worker state when a worker process starts."""

    # ignore_result: the task pushes its replies itself (workers._backend.ReplyPusher) and returns
    # None, so Celery neither reprs nor stores a result. Errors that escape it still reach the
    # caller through the backend (store_errors_even_if_ignored).
    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_NAME,
        bind=True,
        ignore_result=True,
        store_errors_even_if_ignored=True,
        Strategy="workers._strategy:guarded",  # refuses malformed messages instead of dying
    )
    def execute(self: Any, *jobs: dict[str, Any], announce: bool = False) -> None:
        """Run each job of the message in order, replying to each as soon as it is done.

        A message carries one job, or several for the same shard that one client coalesced
        (``producer._batching``); each is dropped on its own if its caller has given up. With
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

    def warm(**_: Any) -> None:
        configure_logging()
        # Our "execution" event is the one line per task; Celery's received/succeeded lines
        # would format every result again on the hot path.
        for name in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(name).setLevel(logging.WARNING)
        worker_state(app.settings)

    def ready(sender: Any = None, **_: Any) -> None:
        warm()
        keys = app.settings.keys
        consumed = [keys.shard_of_queue(q) for q in app.amqp.queues.consume_from or app.amqp.queues]
        shards = sorted(n for n in consumed if n is not None)
        worker_state(app.settings).announce(getattr(sender, "hostname", None) or f"pid{os.getpid()}", shards)

    # Prefork children start here; solo and threads pools run in the main process.
    signals.worker_process_init.connect(warm, weak=False)
    signals.worker_ready.connect(ready, weak=False)
