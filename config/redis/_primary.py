"""Following a Sentinel primary that moved: for pools (a watch thread) and for long-lived
connections (:class:`PrimaryCheck`).

A connection whose primary froze and came back still answers, and the old node still says it is
master until the sentinels convert it, so nothing fails that would make it reconnect; these ask
the sentinels instead.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any

import redis
from redis.sentinel import SentinelConnectionPool

from scriptpool.config._logging import get_logger

log = get_logger("redis")

# How often the primary watch asks the sentinels where each watched pool's primary is.
PRIMARY_CHECK_S = 1.0


def primary_address(pool: redis.ConnectionPool) -> tuple[str, int] | None:
    """Where the sentinels say ``pool``'s primary is now; None for a direct pool, or when no
    sentinel names one (it is down and not yet replaced). Asking also closes the pool's idle
    connections if the primary moved, so they reconnect to the new one."""
    if not isinstance(pool, SentinelConnectionPool):
        return None
    try:
        address: tuple[str, int] = pool.get_master_address()  # type: ignore[no-untyped-call]
    except (redis.RedisError, OSError):
        return None
    return address


class PrimaryCheck:
    """For a long-lived connection (a subscription, a blocking reader): has Sentinel moved the
    primary away from it? Asks at most every ``every_s`` seconds; never for a direct pool.

    A connection whose primary froze and came back still answers, and the old node still says it
    is master until the sentinels convert it (about 10 s later, measured): without this check a
    subscriber hears nothing of what is published on the new primary in the meantime.
    """

    def __init__(self, pool: redis.ConnectionPool, every_s: float = PRIMARY_CHECK_S) -> None:
        self._pool = pool
        self._every_s = every_s
        self._next = time.monotonic() + every_s
        self.active = isinstance(pool, SentinelConnectionPool)

    def moved(self, connection: Any) -> bool:
        """True if the sentinels name a primary other than the one ``connection`` is on."""
        if not self.active or connection is None:
            return False
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._every_s
        address = primary_address(self._pool)
        here = (getattr(connection, "host", None), getattr(connection, "port", None))
        return address is not None and here[0] is not None and tuple(address) != here


class _PrimaryWatch:
    """Asks the sentinels every second where the primary of each Sentinel pool of this process
    is, so pooled connections left on a node that stopped being primary are closed (by redis-py,
    when the address changes) instead of writing into a node the sentinels will wipe. One
    question per Sentinel set and second, however many pools share it."""

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[SentinelConnectionPool] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = 0

    def add(self, pool: SentinelConnectionPool) -> None:
        with self._lock:
            self._pools.add(pool)
            if self._pid != os.getpid():  # first pool, or a forked child without the thread
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="scriptpool-primary-watch", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(PRIMARY_CHECK_S)
            with self._lock:
                pools = list(self._pools)
            named: dict[tuple[int, str], tuple[str, int] | None] = {}
            for pool in pools:
                key = (id(pool.sentinel_manager), pool.service_name)
                if key not in named:
                    try:
                        found = pool.sentinel_manager.discover_master(pool.service_name)
                        named[key] = (str(found[0]), int(found[1]))
                    except (redis.RedisError, OSError):
                        named[key] = None  # no sentinel names one now: leave the pools be
                address = named[key]
                before = pool.master_address
                if address is None or (before is not None and tuple(before) == address):
                    continue
                primary_address(pool)  # records the new address, closes idle connections
                if before is not None:
                    moved = f"{address[0]}:{address[1]}"
                    log.warning("redis_primary_moved", service=pool.service_name, primary=moved)


_watch = _PrimaryWatch()


def watch_primary(pool: SentinelConnectionPool) -> None:
    """Have the process-wide watch follow ``pool``'s primary (started with the first pool)."""
    _watch.add(pool)
