"""Unit tests of parts that the pool tests only exercise from afar: the circuit breaker (with its
injectable clock), the reconnect loop, invalidation, the extension-point reader and telemetry."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from prometheus_client import REGISTRY

from scriptpool.config import ExtensionPoint, ExtensionPointReader, Keys
from scriptpool.config.errors import (
    DeadlineExceeded,
    GuestRuntimeError,
    InvalidInput,
    UnknownExtensionPoint,
    error_class_for,
)
from scriptpool.config.heartbeats import WorkerHeartbeat, shard_count_disagreement
from scriptpool.config.redis import InvalidationListener, Reconnector
from scriptpool.config.wire import ErrorInfo, Execution, ExecutionReport
from scriptpool.producer import BreakerPolicy
from scriptpool.producer._breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from scriptpool.runtime import CacheStats
from scriptpool.workers import _telemetry as telemetry
from tests.logs import captured_events


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_within_window_only() -> None:
    """Failures spread wider than the window never open it; ``threshold`` within it do."""
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(error_threshold=3, error_window_s=10, cooldown_s=2), clock)
    for _ in range(5):
        breaker.failure()
        clock.now += 6  # each failure falls out of the window before the third arrives
    assert breaker.state == CLOSED and breaker.allow()
    for _ in range(3):
        breaker.failure()
    assert breaker.state == OPEN and not breaker.allow()


def test_breaker_half_opens_lets_one_probe_through_and_closes_or_reopens() -> None:
    """After the cool-down exactly one call passes; its success closes the breaker, its failure
    opens it for another cool-down."""
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(error_threshold=1, error_window_s=10, cooldown_s=2), clock)
    breaker.failure()
    assert breaker.state == OPEN
    clock.now += 2
    assert breaker.state == HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # one probe only
    breaker.failure()
    assert breaker.state == OPEN
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow() and breaker.allow()


def test_error_classes_say_what_a_code_means_to_the_caller() -> None:
    """``trips_breaker`` and ``fallback`` are properties of the classes, found by code."""
    assert error_class_for("timeout") is DeadlineExceeded
    assert DeadlineExceeded.trips_breaker and DeadlineExceeded.fallback
    assert not GuestRuntimeError.trips_breaker and not GuestRuntimeError.fallback
    assert not InvalidInput.trips_breaker and not InvalidInput.fallback
    assert not error_class_for("circuit_open").trips_breaker and error_class_for("circuit_open").fallback


def test_reconnector_retries_with_growing_backoff_and_resets_when_healthy() -> None:
    """A session that fails is retried after 1x, 2x, 4x the initial backoff (capped); one that
    reports itself healthy starts from the initial backoff again; stop ends the loop."""
    attempts: list[int] = []
    done = threading.Event()

    def session(loop: Reconnector) -> None:
        attempts.append(1)
        if len(attempts) == 5:
            loop.healthy()
        if len(attempts) >= 7:
            done.set()
            loop.stopping.wait()
            return
        raise redis.ConnectionError("down")

    with captured_events() as events:
        loop = Reconnector("unit", session, initial_backoff_s=0.01, max_backoff_s=0.04).start()
        assert done.wait(5)
        loop.stop()
    assert not loop.alive
    waits = [e["backoff_s"] for e in events if e["event"] == "unit_reconnecting"]
    assert waits == [0.01, 0.02, 0.04, 0.04, 0.01, 0.02]


def test_reconnector_logs_a_bug_with_its_traceback_and_keeps_going() -> None:
    """An unexpected exception in a session is logged as ``<name>_failed`` and retried."""
    calls: list[int] = []
    done = threading.Event()

    def session(loop: Reconnector) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug")
        done.set()
        loop.stopping.wait()

    with captured_events() as events:
        loop = Reconnector("unit", session, initial_backoff_s=0.01).start()
        assert done.wait(5)
        loop.stop()
    failed = [e for e in events if e["event"] == "unit_failed"]
    assert len(failed) == 1 and failed[0]["exc_info"]


def test_invalidation_listener_forgets_what_is_published_and_everything_on_subscribe(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """A real subscription: on (re)subscribing it forgets everything; then each message forgets
    the pair or EP it names, and a malformed one is logged and ignored."""
    forgotten: list[tuple[str | None, str | None]] = []
    listener = InvalidationListener(
        redis_url, "unit:invalidate", lambda ep, shop: forgotten.append((ep, shop))
    )
    listener.start()
    try:
        assert listener.wait_subscribed(5)
        assert forgotten == [(None, None)]
        redis_client.publish("unit:invalidate", json.dumps({"ep": "discount", "shop_id": "7"}))
        redis_client.publish("unit:invalidate", json.dumps({"ep": "discount"}))
        deadline = time.monotonic() + 5
        while len(forgotten) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert forgotten[1:] == [("discount", "7"), ("discount", None)]
        with captured_events() as events:
            listener.apply(b"not json")
        assert [e["event"] for e in events] == ["invalidation_message_malformed"]
    finally:
        listener.stop()


def test_extension_point_reader_caches_prepares_once_and_rechecks_unknown_names(
    redis_client: redis.Redis,
) -> None:
    """The one EP reader: ``prepare`` runs once per definition read; an invalidated or expired
    entry is read again; an unknown EP is asked about again after a second."""
    keys = Keys("unit")
    clock = Clock()
    prepared: list[str] = []
    reader = ExtensionPointReader(
        redis_client, keys, lambda ep: prepared.append(ep.name) or ep.name, ttl_s=5, clock=clock
    )
    with pytest.raises(UnknownExtensionPoint):
        reader.get("discount")
    redis_client.set(keys.extension_point("discount"), ExtensionPoint("discount").to_json())
    with pytest.raises(UnknownExtensionPoint):
        reader.get("discount")  # the unknown answer is kept for a second
    clock.now += 1.0
    assert reader.get("discount") == "discount" and reader.get("discount") == "discount"
    assert prepared == ["discount"]
    reader.invalidate("discount")
    assert reader.get("discount") == "discount" and prepared == ["discount"] * 2
    clock.now += 5.0
    reader.get("discount")
    assert prepared == ["discount"] * 3


def _metric(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def test_telemetry_counts_each_execution_and_logs_one_event() -> None:
    """One execution: its counter by status and code, its stage histograms, one log event with
    the report's fields."""
    failed = Execution(
        False,
        None,
        ErrorInfo("runtime_error", "trapped", {"trap_code": "unreachable"}),
        ExecutionReport(instructions=42, peak_memory_bytes=65536, run_ms=0.5, sha256="s", version=3),
    )
    before = _metric("scriptpool_executions_total", status="error", error_code="runtime_error")
    runs_before = _metric("scriptpool_stage_seconds_count", stage="run")
    with captured_events() as events:
        telemetry.record_execution(failed, job="j1", shop="7", ep="discount", shard=1, worker="w@h:1")
    assert _metric("scriptpool_executions_total", status="error", error_code="runtime_error") == before + 1
    assert _metric("scriptpool_stage_seconds_count", stage="run") == runs_before + 1
    (event,) = events
    assert event["event"] == "execution" and event["job"] == "j1" and event["error_code"] == "runtime_error"
    assert (event["instructions"], event["peak_memory_bytes"], event["version"]) == (42, 65536, 3)


def test_heartbeats_round_trip_and_name_a_shard_count_disagreement() -> None:
    """What a worker writes is what readers parse; workers with another shard count are named."""
    beat = telemetry.describe_worker(
        "w0@h", [0, 2], 4, CacheStats(1, 10, 100, 5, 1, 0), executed=9, dropped=2
    )
    parsed = WorkerHeartbeat.from_json(beat.to_json(token="secret"))
    assert parsed == beat
    assert WorkerHeartbeat.from_json(b"{not json") is None
    assert WorkerHeartbeat.from_json(json.dumps({"pid": 1})) is None
    other = WorkerHeartbeat("w1@h", "h", 2, (1,), shard_count=2)
    assert shard_count_disagreement([beat, other], 4) == {2: ["w1@h"]}
    assert shard_count_disagreement([beat], 4) == {}
