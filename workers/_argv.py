"""The command line of a shard worker, for the ``worker`` command and for pools that tests and
benchmarks start themselves (with a log file or a pool type of their own). It imports no Celery:
``scriptpool worker`` builds this command line and replaces itself with it."""

from __future__ import annotations

import os
import sys

from scriptpool.config import Settings


def worker_argv(
    settings: Settings,
    shards: list[int],
    *,
    name: str | None = None,
    loglevel: str = "INFO",
    events: bool = False,
    pool: str = "solo",
) -> list[str]:
    """The plain Celery command line a shard worker runs."""
    queues = ",".join(settings.keys.queue(n) for n in shards)
    node = name or f"shard{'-'.join(map(str, shards))}-{os.getpid()}@%h"
    argv = [
        sys.executable, "-m", "celery", "-A", "scriptpool.workers", "worker", "-Q", queues, "-n", node,
        "--pool", pool, "--loglevel", loglevel, "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    if pool == "solo":
        argv += ["--concurrency", "1"]  # what solo runs; Celery's default would be the CPU count
    # Celery's worker heartbeat is an event: Flower lists a worker from its heartbeats, so a
    # worker that sends events keeps them; without events they would be sent to nobody.
    argv.append("--events" if events else "--without-heartbeat")
    return argv
