"""The Celery app: one factory for workers and producers, configured from explicit settings."""

from __future__ import annotations

import logging
import os
import sys
from functools import cached_property
from typing import Any

from celery import Celery, signals
from kombu.entity import Queue

from scriptpool.config import Settings, ShardGroup, configure_logging, get_logger
from scriptpool.config.redis import celery_broker

log = get_logger("worker")


def broker_config(settings: Settings) -> dict[str, Any]:
    """The broker part of Celery's settings: ``settings.redis_url`` (a worker's is its group's),
    connected as every other client of ours connects (``scriptpool.config.redis.celery_broker``:
    TLS verified as redis-py does, Sentinel with the same credentials and timeouts)."""
    broker = celery_broker(settings.redis_url, timeout=1.0, connect_timeout=0.25)
    broker["broker_transport_options"].update(
        max_retries=0,
        # No unacked hash: kombu's ack emulation costs two Redis round trips per message
        # (record on delivery, delete on ack), measured 0.6 ms of queue wait. What it buys,
        # redelivery of a message whose worker died holding it, is worth nothing here: the
        # job's caller has fallen back by then and the worker would drop it as stale.
        ack_emulation=False,
    )
    return broker


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from ours: one queue per shard, msgpack only, fail fast."""
    keys = settings.keys
    queues = [
        Queue(keys.queue(n), routing_key=keys.queue(n))  # type: ignore[no-untyped-call]
        for n in range(settings.shards)
    ]
    return {
        **broker_config(settings),
        "result_backend": "scriptpool.workers._backend:ReplyListBackend",
        # msgpack measured 3x faster than JSON per job (5.6 vs 16.7 us) and carries input bytes
        # as-is. Pickle is never accepted.
        "task_serializer": "msgpack",
        "result_serializer": "msgpack",
        "accept_content": ["msgpack"],
        "result_accept_content": ["msgpack"],
        "task_queues": queues,
        "task_default_queue": keys.queue(0),
        "task_create_missing_queues": False,  # a wrong queue name is an error, not a dead letter
        "task_publish_retry": False,  # the caller's deadline, not Celery, decides how long to try
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # workers reconnect by themselves, forever
        # Reconnects every 0.2-0.5 s instead of Celery's 2, 4, 6... s (scriptpool.workers._failover).
        "worker_consumer": "scriptpool.workers._failover:Consumer",
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "task_acks_late": False,
        "result_expires": None,
        "enable_utc": True,
    }


class ScriptpoolCelery(Celery):  # type: ignore[misc]
    """A Celery app that carries our :class:`Settings`, resolved from the environment on first
    use when none were given, so nothing is read at import time."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__("scriptpool", set_as_current=False)
        if settings is not None:
            self.__dict__["settings"] = settings
        self.add_defaults(lambda: celery_config(self.settings))

    @cached_property
    def settings(self) -> Settings:
        return Settings.from_env()

    def use_group(self, group: ShardGroup) -> None:
        """Serve ``group`` (a worker, once it knows its shards): its broker, registry, replies,
        heartbeat and invalidations are all on that group's Redis."""
        self.__dict__["settings"] = self.settings.for_group(group)
        self.conf.update(broker_config(self.settings))


def create_app(settings: Settings | None = None) -> ScriptpoolCelery:
    """Build the app with our task registered (importing the task does not load wasmtime)."""
    app = ScriptpoolCelery(settings)
    from scriptpool.workers import _transport
    from scriptpool.workers._failover import PrimaryWatch
    from scriptpool.workers._tasks import register

    _transport.install()  # a message kombu cannot parse is refused, not the worker's end

    register(app)
    app.steps["consumer"].add(PrimaryWatch)
    # Signals are process-wide: one receiver each, however many apps are made.
    signals.celeryd_init.connect(_before_start, weak=False, dispatch_uid="scriptpool-before-start")
    signals.celeryd_after_setup.connect(_starting, weak=False, dispatch_uid="scriptpool-starting")
    signals.worker_ready.connect(_ready, weak=False, dispatch_uid="scriptpool-ready")
    signals.worker_shutting_down.connect(_shutting_down, weak=False, dispatch_uid="scriptpool-shutting-down")
    return app


# -- the worker's own lines: JSON when not on a terminal ------------------------------------------
# Celery writes a 27-line banner to stdout, Python's SecurityWarning about running as root to
# stderr (Celery checks the user before it sets up logging), and "worker: Warm shutdown" lines
# from its signal handlers. Off a terminal each becomes one JSON event like every other line;
# on a terminal the banner stays, for people.


def _on_terminal() -> bool:
    stdout = sys.__stdout__
    return stdout is not None and stdout.isatty()


def _level(loglevel: Any) -> int:
    level = loglevel if isinstance(loglevel, int) else logging.getLevelName(str(loglevel or "INFO").upper())
    return level if isinstance(level, int) else logging.INFO


def _pool_name(pool: Any) -> str:
    """``solo``, ``prefork``...: of a pool given by name, by path or as its class (Celery's
    command line hands over the class, ``celery.concurrency.solo.TaskPool``)."""
    path = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    return str(path).split(":")[0].rsplit(".", 1)[-1]


def _before_start(sender: Any = None, instance: Any = None, options: Any = None, **_: Any) -> None:
    """``celeryd_init``: before Celery checks the user, sets its defaults and logging."""
    options = options or {}
    if instance is not None and not _on_terminal():
        instance.quiet = True  # no banner: _starting logs what it says, as one event
    # Logging now rather than at Celery's setup_logging (which sets it again, the same way), so
    # that the SecurityWarning Celery gives next when run as root is a python_warning event.
    logfile = options.get("logfile")
    if logfile and instance is not None:
        from celery.utils.nodenames import node_format

        logfile = node_format(logfile, instance.hostname)
    configure_logging(level=_level(options.get("loglevel")), filename=logfile or None)


def _starting(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """``celeryd_after_setup``: what Celery's banner says, as one event."""
    if instance is None:
        return
    import celery

    app = instance.app
    if _pool_name(instance.pool_cls) == "solo":
        # The solo pool runs one task at a time (its limit is 1); without -c Celery keeps its
        # default, the CPU count, which the banner showed as "concurrency: 2 (solo)".
        instance.concurrency = 1
    with app.connection() as connection:
        transport = connection.as_uri()  # the password masked
    log.info(
        "worker_starting",
        worker=str(instance.hostname),
        celery=celery.__version__,
        transport=transport,
        pool=_pool_name(instance.pool_cls),
        concurrency=instance.concurrency,
        queues=sorted(app.amqp.queues.consume_from or app.amqp.queues),
        task_events=bool(instance.task_events),
        tasks=sorted(name for name in app.tasks if not name.startswith("celery.")),
        uid=os.getuid(),
    )


def _ready(sender: Any = None, **_: Any) -> None:
    """``worker_ready``: Celery's shutdown handlers are installed by now; off a terminal, put
    them back without their lines on stdout (``_shutting_down`` logs the event instead)."""
    worker = getattr(sender, "controller", None)
    if worker is None or _on_terminal():
        return
    from celery.apps import worker as program

    program.install_worker_term_handler(worker, verbose=False)
    program.install_worker_term_hard_handler(worker, verbose=False)
    # Celery's own SIGINT callback prints a line before arming the cold shutdown; this arms it.
    program.install_worker_int_handler(
        worker,
        verbose=False,
        callback=lambda w: program.install_worker_term_hard_handler(w, sig="SIGINT", verbose=False),
    )


def _shutting_down(sig: Any = None, how: Any = None, exitcode: Any = None, **_: Any) -> None:
    """``worker_shutting_down``: the event for Celery's "worker: Warm shutdown" line."""
    log.info("worker_shutting_down", signal=str(sig), how=str(how).lower(), exitcode=exitcode)
