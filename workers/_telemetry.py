"""What a worker tells the outside: Prometheus metrics, one log event per execution, and a
heartbeat key that ``scriptpool status`` reads."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from workers._cache import CacheStats
from workers._report import Execution

log = structlog.get_logger("scriptpool.worker")

# Heartbeats expire this long after a worker stops refreshing them (every HEARTBEAT_S).
HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 10

EXECUTIONS = Counter("scriptpool_executions", "Executions by status and error code", ["status", "error_code"])
STAGE_SECONDS = Histogram(
    "scriptpool_stage_seconds",
    "Worker-side time per execution stage",
    ["stage"],
    buckets=(25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25),
)
DROPPED_STALE = Counter("scriptpool_dropped_stale_jobs", "Jobs dropped because their caller gave up")
CACHE = Gauge("scriptpool_module_cache", "Compiled-module cache counters", ["counter"])

_STAGES = ("lookup", "instantiate", "run", "decode")
# Labelled children resolved once: ``labels()`` takes a lock and builds a key on every call.
_STAGE = {stage: STAGE_SECONDS.labels(stage) for stage in _STAGES}
_OUTCOMES: dict[tuple[str, str], Any] = {}


def record_execution(execution: Execution, **context: Any) -> None:
    """Count one execution in the metrics and log it as one structured event."""
    report = execution.report
    code = execution.error.code if execution.error else ""
    status = execution.status
    counter = _OUTCOMES.get((status, code))
    if counter is None:  # a handful of (status, code) pairs exist: one child each, kept
        counter = _OUTCOMES[(status, code)] = EXECUTIONS.labels(status, code)
    counter.inc()
    _STAGE["lookup"].observe(report.lookup_ms / 1000)
    _STAGE["instantiate"].observe(report.instantiate_ms / 1000)
    _STAGE["run"].observe(report.run_ms / 1000)
    _STAGE["decode"].observe(report.decode_ms / 1000)
    log.info(
        "execution",
        **context,
        version=report.version,
        status=status,
        error_code=code or None,
        instructions=report.instructions,
        peak_memory_bytes=report.peak_memory_bytes,
        lookup_ms=report.lookup_ms,
        instantiate_ms=report.instantiate_ms,
        run_ms=report.run_ms,
        decode_ms=report.decode_ms,
        module_source=report.module_source,
    )


def record_dropped() -> None:
    DROPPED_STALE.inc()


def start_metrics_server(port: int) -> None:
    """Serve /metrics on ``port`` (0 disables it)."""
    if port:
        start_http_server(port)
        log.info("metrics_serving", port=port)


class Heartbeat:
    """Refreshes ``sp:worker:<name>`` (a JSON blob with a TTL) while the worker lives."""

    def __init__(self, redis_url: str, key: str, describe: Callable[[], dict[str, Any]]) -> None:
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        self._key = key
        self._describe = describe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                state = self._describe()
                self._redis.set(self._key, json.dumps(state), ex=HEARTBEAT_TTL_S)
                for name, value in state["cache"].items():
                    CACHE.labels(name).set(value)
            except (redis.RedisError, OSError) as exc:
                log.debug("heartbeat_failed", error=str(exc))
            self._stop.wait(HEARTBEAT_S)


def describe_worker(
    name: str, shards: list[int], stats: CacheStats, executed: int, dropped: int
) -> dict[str, Any]:
    """The heartbeat payload."""
    return {
        "name": name,
        "pid": os.getpid(),
        "shards": shards,
        "executed": executed,
        "dropped_stale": dropped,
        "cache": {
            "entries": stats.entries,
            "bytes": stats.bytes,
            "budget_bytes": stats.budget_bytes,
            "hits": stats.hits,
            "misses": stats.misses,
            "evictions": stats.evictions,
        },
        "at": time.time(),
    }
