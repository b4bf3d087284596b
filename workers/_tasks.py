"""The one Celery task: run the jobs of a message on this process's state
(``scriptpool.workers._state``), fairly between shops (``scriptpool.workers._serve``), dropping
those whose callers gave up, and reply to each as soon as it is done. Also the worker's
lifecycle: logging, its shard group, its name and metrics port (claimed before it consumes
anything), and a clean stop."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from celery import signals

from scriptpool.config import Keys, configure_logging, get_logger
from scriptpool.config.errors import ConfigurationError
from scriptpool.workers import _tracing as tracing
from scriptpool.workers._envelope import Delivery
from scriptpool.workers._state import inherited_state, set_lingering, set_pool_processes, worker_state

if TYPE_CHECKING:
    from celery import Celery

log = get_logger("worker")

# What a worker that cannot start as configured exits with (the CLI's "usage mistake" code).
EXIT_MISCONFIGURED = 2


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
        """Run the jobs of the message, replying to each as soon as it is done.

        A message carries one job, or several for the same shard that one client coalesced
        (``scriptpool.producer._batching``); each is dropped on its own if its caller has given up. With
        ``announce`` the client first hears that the message was taken, so it can publish the
        calls that piled up meanwhile while this worker is still busy. While jobs wait, the
        worker also takes in what queued up on the shard meanwhile and runs it all fairly
        between shops (``scriptpool.workers._serve``).
        """
        state = worker_state(app.settings)
        request = self.request
        queue = (request.delivery_info or {}).get("routing_key") or ""
        shard = app.settings.keys.shard_of_queue(queue)
        delivery = Delivery(jobs, request.reply_to, announce, -1 if shard is None else shard)
        state.server.serve(delivery, queue, request)

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
        # The solo pool runs one process whatever -c says; prefork, threads... run -c of them.
        pool = str(getattr(getattr(instance, "pool_cls", None), "__module__", "solo"))
        solo = "solo" in pool
        if "prefork" in pool:
            tracing.not_in_this_process()  # the children trace, each set up after its fork
        set_pool_processes(1 if solo else int(getattr(instance, "concurrency", 1) or 1))
        # Only the solo pool's process has no BRPOP of Celery's pending while it runs a job, and
        # no consumer holding the next message for it meanwhile.
        set_lingering({keys.queue(n): n for n in shards} if solo else None)
        try:
            worker_state(app.settings).announce(name, shards)
        except ConfigurationError as exc:
            log.error("worker_refused_to_start", reason=exc.message, worker=name)
            raise SystemExit(EXIT_MISCONFIGURED) from None

    def fresh_state_after_fork(**_: Any) -> None:
        # A prefork child inherits the parent's state without its threads (ticker, listener);
        # the solo pool sends this signal too, in the process that made the state.
        inherited_state()
        worker_state(app.settings)

    def shutdown(**_: Any) -> None:
        state = inherited_state()
        if state is not None:
            state.shutdown()
        tracing.shutdown()  # flush the spans this process still holds (if it traces)

    signals.celeryd_init.connect(choose_group, weak=False)
    signals.setup_logging.connect(setup_logging, weak=False)
    signals.celeryd_after_setup.connect(init, weak=False)
    # Prefork children start here; solo and threads pools run in the main process.
    signals.worker_process_init.connect(fresh_state_after_fork, weak=False)
    signals.worker_shutdown.connect(shutdown, weak=False)
    # A prefork child's own stop: its spans are flushed too (the solo pool has no children).
    signals.worker_process_shutdown.connect(lambda **_: tracing.shutdown(), weak=False)
