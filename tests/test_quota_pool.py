"""Quotas through real workers: two workers of one shard hold one shop's caps between them, a
refused call is its caller's fallback at once, and what is refused is counted in usage."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from scriptpool import Client, Outcome, Registry, Settings
from scriptpool.config.quotas import Quota, clear_quota, set_quota
from scriptpool.config.usage import read_usage
from scriptpool.producer import BatchPolicy
from tests import guests
from tests.conftest import TEST_ARTIFACT_KEY, deployer_fixture
from tests.pool import WorkerProcess, shop_on, start_workers

SHARDS = 2
# About 4M instructions: one run puts a bucket of a small rate deep in debt.
HEAVY = guests.echo(burn=1_000_000)


@pytest.fixture(scope="module")
def pool_settings(redis_url: str) -> Settings:
    """Two shards; usage flushed every 0.2 s so a test reads it soon."""
    return Settings(redis_url=redis_url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS, usage_flush_s=0.2)


@pytest.fixture(scope="module")
def workers(pool_settings: Settings) -> Iterator[dict[str, WorkerProcess]]:
    """Two workers of shard 0."""
    started = start_workers(pool_settings, {"q0a": [0], "q0b": [0]})
    yield {worker.name: worker for worker in started}
    for worker in started:
        worker.stop()


deployer = deployer_fixture(after=("workers",))
SHOP = shop_on(0, SHARDS, prefix="quota")
OTHER = shop_on(0, SHARDS, prefix="quota", skip=1)


def _concurrently(client: Client, shop: str, calls: int) -> list[tuple[float, Outcome]]:
    """``calls`` calls at once, each with the wall-clock time it was made."""
    outcomes: list[tuple[float, Outcome]] = []
    lock = threading.Lock()

    def call() -> None:
        made = time.time()
        outcome = client.run("test", shop, {}, timeout=5, fallback="fb")
        with lock:
            outcomes.append((made, outcome))

    threads = [threading.Thread(target=call) for _ in range(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def _run_span(made: float, outcome: Outcome) -> tuple[float, float]:
    """When the worker's run of the call began (after its admission: the report's stages end at
    the finish) and when it finished (wall clock, one machine)."""
    t, report = outcome.timings, outcome.report
    assert report is not None
    received = made + (t.validate_ms + t.serialize_ms + t.enqueue_ms + t.queue_wait_ms) / 1000
    finished = received + t.execute_ms / 1000
    ran_ms = report.lookup_ms + report.instantiate_ms + report.run_ms + report.decode_ms
    return finished - ran_ms / 1000, finished


def _wait_for_usage(client: redis.Redis, settings: Settings, shop: str, status: str, count: int) -> int:
    deadline = time.monotonic() + 10
    while True:
        rows = read_usage(client, settings.keys, shop=shop, since_s=600)
        seen = sum(row.by_status.get(status, 0) for row in rows)
        if seen >= count or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def test_a_concurrency_slot_held_elsewhere_refuses_calls_on_both_workers(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, redis_client: redis.Redis
) -> None:
    """A shop capped at one call at a time whose one slot is held (as by a third worker's long
    run): every call, on either worker of the shard, is refused with ``quota_exceeded`` at once,
    a fallback, and counted in usage as refused; freed, calls run again. The other shop of the
    shard is untouched."""
    from scriptpool.workers._quotas import QuotaGate  # the gate a worker holds, as a third worker

    deployer.deploy("test", SHOP, guests.ECHO)
    deployer.deploy("test", OTHER, guests.ECHO)
    set_quota(redis_client, pool_settings.keys, SHOP, Quota(max_concurrent=1))
    holder = QuotaGate(redis_client, pool_settings.keys)
    assert holder.admit("held-elsewhere", SHOP, ["default"], time.time() + 60) is None
    time.sleep(1.1)  # the workers' cached quotas (about a second) have expired
    with Client(pool_settings, batching=BatchPolicy(window=0)) as client:
        outcomes = [o for _, o in _concurrently(client, SHOP, 20)]
        assert {(o.status, o.error_code, o.output) for o in outcomes} == {
            ("fallback", "quota_exceeded", "fb")
        }
        assert all(o.error is not None and o.error.detail["limit"] == "concurrency" for o in outcomes)
        assert {o.worker.split("@")[0] for o in outcomes if o.worker} <= {"q0a", "q0b"}
        assert client.run("test", OTHER, {}, timeout=5).ok
        holder.finish("held-elsewhere", SHOP, {"default": 0})
        after = [client.run("test", SHOP, {}, timeout=5) for _ in range(4)]  # one at a time
        assert all(o.ok for o in after), [(o.error_code, o.error and o.error.detail) for o in after]
    assert _wait_for_usage(redis_client, pool_settings, SHOP, "refused", 20) == 20
    clear_quota(redis_client, pool_settings.keys, SHOP)


def test_concurrency_cap_holds_across_two_workers(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, redis_client: redis.Redis
) -> None:
    """Capped at one call at a time, a shop whose calls both workers of its shard take at once
    never has two running: of the calls that ran, no two runs overlap in time (from the
    workers' own receive and finish times), and the rest were refused."""
    deployer.deploy("test", SHOP, HEAVY)
    set_quota(redis_client, pool_settings.keys, SHOP, Quota(max_concurrent=1))
    time.sleep(1.1)
    runs: list[tuple[float, float]] = []
    refused = 0
    with Client(pool_settings, batching=BatchPolicy(window=0)) as client:
        for _ in range(5):
            outcomes = _concurrently(client, SHOP, 8)
            kinds = {(o.status, o.error_code) for _, o in outcomes}
            assert kinds <= {("ok", None), ("fallback", "quota_exceeded")}, kinds
            runs.extend(_run_span(made, o) for made, o in outcomes if o.ok)
            refused += sum(1 for _, o in outcomes if not o.ok)
    clear_quota(redis_client, pool_settings.keys, SHOP)
    assert runs and refused
    runs.sort()
    for (_, end), (start, _) in itertools.pairwise(runs):
        # The slot is freed after the reply, so the next run starts after the last one ended
        # (1 ms for the two clocks' readings of one instant).
        assert start > end - 0.001, runs


def test_work_per_second_cap_refuses_after_one_heavy_run(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, redis_client: redis.Redis
) -> None:
    """A shop allowed 1,000 instructions a second runs one call of 4M instructions (its bucket
    was full), which puts it in debt: its next calls, on either worker, are refused with
    ``instructions_per_second``; another shop of the shard is not."""
    deployer.deploy("test", SHOP, HEAVY)
    deployer.deploy("test", OTHER, guests.ECHO)
    set_quota(redis_client, pool_settings.keys, SHOP, Quota(max_instructions_per_s=1_000))
    time.sleep(1.1)
    with Client(pool_settings) as client:
        first = client.run("test", SHOP, {}, timeout=5)
        assert first.ok and first.report is not None and first.report.instructions > 1_000
        later = [client.run("test", SHOP, {}, timeout=5, fallback="fb") for _ in range(6)]
        assert {(o.status, o.error_code) for o in later} == {("fallback", "quota_exceeded")}
        assert {o.error.detail["limit"] for o in later if o.error} == {"instructions_per_second"}
        assert client.run("test", OTHER, {}, timeout=5).ok
    clear_quota(redis_client, pool_settings.keys, SHOP)
