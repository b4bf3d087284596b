"""What a worker tells the outside: Prometheus metrics, one log event per execution, and a
heartbeat key that ``scriptpool status`` and clients read."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from scriptpool.config import Keys, get_logger
from scriptpool.config.errors import ConfigurationError
from scriptpool.config.heartbeats import WorkerHeartbeat
from scriptpool.config.redis import Reconnector, redis_client
from scriptpool.config.store import SCOPES as STORE_SCOPES
from scriptpool.config.wire import Execution
from scriptpool.runtime import CAPTURE_RESULTS

if TYPE_CHECKING:
    from scriptpool.runtime import CacheStats, StoreStats

log = get_logger("worker")

EXECUTIONS = Counter("scriptpool_executions", "Executions by status and error code", ["status", "error_code"])
STAGE_SECONDS = Histogram(
    "scriptpool_stage_seconds",
    "Worker-side time per execution stage",
    ["stage"],
    buckets=(25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25),
)
DROPPED_STALE = Counter("scriptpool_dropped_stale_jobs", "Jobs dropped because their caller gave up")
REFUSED = Counter(
    "scriptpool_refused_jobs", "Jobs answered quota_exceeded without running, by reason", ["reason"]
)
_REFUSED = {
    reason: REFUSED.labels(reason)
    for reason in ("fair_share", "concurrency", "instructions_per_second", "other")
}
CACHE = Gauge("scriptpool_module_cache", "Compiled-module cache counters", ["counter"])
CAPTURED = Counter("scriptpool_captured_runs", "Runs captured for replay, by result", ["result"])
# Every result's child made now, so /metrics shows each at 0 before the first capture.
_CAPTURED = {result: CAPTURED.labels(result) for result in CAPTURE_RESULTS}

# Writes scripts returned (``storeWrites``) as the worker dealt with them after the reply:
# applied; refused by a store cap checked at apply time (keys per scope, bytes per shop), which
# no caller hears of any more; failed (Redis did not answer: the run's writes are lost); late
# (the caller had given up, so it never saw the run: its writes are not applied).
STORE_WRITE_RESULTS = ("applied", "refused", "failed", "late")
STORE_WRITES = Counter("scriptpool_store_writes", "Script data writes after the reply, by result", ["result"])
_STORE_WRITES = {result: STORE_WRITES.labels(result) for result in STORE_WRITE_RESULTS}

# The script data cache (scriptpool.runtime.StoreCache), set with each heartbeat: per scope
# only (APP, SHOP, SESSION), never per app, shop or key.
STORE_CACHE_READS = Gauge(
    "scriptpool_store_cache_reads", "Script data reads since the worker started, by scope", ["scope"]
)
STORE_CACHE_HIT_RATIO = Gauge(
    "scriptpool_store_cache_hit_ratio",
    "Share of script data reads served from the worker's memory since it started, by scope",
    ["scope"],
)
STORE_CACHE_BYTES = Gauge("scriptpool_store_cache_bytes", "Bytes of script data the worker holds")

# Usage totals of this worker (per shop, app and EP they are `scriptpool usage`'s, in Redis):
# labels only from fixed sets, so the series stay few however many shops there are.
INSTRUCTIONS = Counter("scriptpool_instructions", "Wasm instructions scripts executed (the billable unit)")
EXECUTION_SECONDS = Counter(
    "scriptpool_execution_seconds", "Worker-side time of script runs: lookup, instantiate, run, decode"
)
SCRIPT_BYTES = Counter("scriptpool_script_bytes", "Bytes scripts read (in) and wrote (out)", ["direction"])
_BYTES_IN, _BYTES_OUT = SCRIPT_BYTES.labels("in"), SCRIPT_BYTES.labels("out")

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


def record_usage(costs: tuple[int, int, int, int]) -> None:
    """Add one job's costs to the usage totals: instructions, µs, bytes in, bytes out (the
    usage recorder's ``count``)."""
    instructions, micros, bytes_in, bytes_out = costs
    INSTRUCTIONS.inc(instructions)
    EXECUTION_SECONDS.inc(micros / 1e6)
    _BYTES_IN.inc(bytes_in)
    _BYTES_OUT.inc(bytes_out)


def record_store_writes(result: str, writes: int) -> None:
    """Count ``writes`` script data writes that ended as ``result`` (one of STORE_WRITE_RESULTS)."""
    _STORE_WRITES[result].inc(writes)


def record_dropped() -> None:
    DROPPED_STALE.inc()


def record_refused(reason: str) -> None:
    """Count a job answered ``quota_exceeded`` (``reason``: ``fair_share``, ``concurrency`` or
    ``instructions_per_second``; no shop label: per-shop figures are ``scriptpool usage``'s)."""
    _REFUSED[reason if reason in _REFUSED else "other"].inc()


def record_captured(result: str, runs: int) -> None:
    """Count how ``runs`` captured runs ended (the capture writer's ``count``)."""
    _CAPTURED[result].inc(runs)


def start_metrics_server(port: int) -> None:
    """Serve /metrics on ``port`` (0 disables it); a port that cannot be opened is an error."""
    if not port:
        return
    try:
        start_http_server(port)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on port {port}: {exc.strerror or exc}", variable="SCRIPTPOOL_METRICS_PORT"
        ) from None
    log.info("metrics_serving", port=port)


# Claim or refresh a heartbeat unless another live worker holds the name: returns the holder's
# heartbeat when it is someone else's (ARGV[2] is our token), else sets ours and returns false.
_REFRESH = """
local current = redis.call('GET', KEYS[1])
if current and ARGV[3] == '0' and cjson.decode(current)['token'] ~= ARGV[2] then return current end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
return false
"""
_RELEASE = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current)['token'] == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class NameTaken(ConfigurationError):
    """Raised when a live worker already runs under the name this one was started with."""


class Heartbeat:
    """Keeps ``<prefix>:worker:<name>`` (JSON with a TTL) fresh while the worker lives.

    The name is the worker's: :meth:`claim` refuses it while another live worker holds it, and a
    clean stop deletes the key at once, so ``status`` does not show a stopped worker as live.
    """

    def __init__(self, redis_url: str, key: str, describe: Callable[[], WorkerHeartbeat]) -> None:
        self._redis = redis_client(redis_url, timeout=1, connect_timeout=1)
        self._key = key
        self._describe = describe
        self.token = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(6).hex()}"
        self._refresh = self._redis.register_script(_REFRESH)
        self._release = self._redis.register_script(_RELEASE)
        self._loop = Reconnector("heartbeat", self._session, logger=log)

    def claim(self) -> None:
        """Take the name, or raise :class:`NameTaken` if a live worker elsewhere holds it.

        A heartbeat left by a dead process of this host (a restart after a crash), or by this
        very process id (a restarted container), is stale and taken over.
        """
        holder = self._write(force=False)
        if holder is None:
            return
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
            self._write(force=True)
            return
        raise NameTaken(
            f"a worker named {holder.get('name')!r} is already live (pid {holder.get('pid')} on "
            f"{holder.get('host')}); start this one with another --name",
            worker=holder.get("name"),
        )

    def start(self) -> Heartbeat:
        self._loop.start()
        return self

    def stop(self) -> None:
        """Stop refreshing and delete the heartbeat if it is still ours."""
        self._loop.stop(timeout=2)
        try:
            self._release(keys=[self._key], args=[self.token])
        except redis.RedisError as exc:
            log.warning("heartbeat_release_failed", error=str(exc))

    def _write(self, *, force: bool) -> dict[str, Any] | None:
        beat = self._describe()
        args = [beat.to_json(token=self.token), self.token, "1" if force else "0", Keys.HEARTBEAT_TTL_S]
        held = self._refresh(keys=[self._key], args=args)
        for name, count in beat.cache.items():
            CACHE.labels(name).set(count)
        _store_gauges(beat.store)
        return json.loads(held) if held else None

    def _session(self, loop: Reconnector) -> None:
        while not loop.stopping.is_set():
            holder = self._write(force=False)
            loop.healthy()
            if holder is not None:
                log.error("worker_name_taken", worker=holder.get("name"), pid=holder.get("pid"))
            loop.stopping.wait(Keys.HEARTBEAT_S)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own pid in an old heartbeat: this process restarted in place
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _store_gauges(store: dict[str, int]) -> None:
    if "bytes" in store:
        STORE_CACHE_BYTES.set(store["bytes"])
    for scope in STORE_SCOPES:
        hits, misses = store.get(f"hits_{scope.lower()}", 0), store.get(f"misses_{scope.lower()}", 0)
        STORE_CACHE_READS.labels(scope).set(hits + misses)
        if hits + misses:
            STORE_CACHE_HIT_RATIO.labels(scope).set(hits / (hits + misses))


def describe_store(stats: StoreStats | None) -> dict[str, int]:
    """The script data cache's counters as a heartbeat carries them."""
    if stats is None:
        return {}
    out = {
        "entries": stats.entries,
        "bytes": stats.bytes,
        "hits": sum(stats.hits.values()),
        "misses": sum(stats.misses.values()),
    }
    for scope in STORE_SCOPES:
        out[f"hits_{scope.lower()}"] = stats.hits.get(scope, 0)
        out[f"misses_{scope.lower()}"] = stats.misses.get(scope, 0)
    return out


def describe_worker(
    name: str,
    shards: list[int],
    shard_count: int,
    stats: CacheStats,
    executed: int,
    dropped: int,
    shard_jobs: dict[int, int] | None = None,
    store: StoreStats | None = None,
) -> WorkerHeartbeat:
    """The heartbeat payload. ``shard_count`` is the worker's ``SCRIPTPOOL_SHARDS``: clients and
    ``status`` compare it with their own. ``store``: the script data cache's counters."""
    cache = {
        "entries": stats.entries,
        "bytes": stats.bytes,
        "budget_bytes": stats.budget_bytes,
        "hits": stats.hits,
        "misses": stats.misses,
        "evictions": stats.evictions,
    }
    return WorkerHeartbeat(
        name,
        socket.gethostname(),
        os.getpid(),
        tuple(shards),
        shard_count,
        executed,
        dropped,
        cache,
        time.time(),
        dict(shard_jobs or {}),
        describe_store(store),
    )
