"""Scenario 1: Redis is killed and restarted while 10,000 jobs run over three shards."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from scriptpool.cli import EmbeddedRedis
from scriptpool.config import Settings
from scriptpool.engine import Sandbox
from scriptpool.producer import BreakerPolicy, Client
from scriptpool.registry import Registry
from tests import guests
from tests.conftest import TEST_ARTIFACT_KEY
from tests.faults._load import Load, Planned, answered_figures, recovery_s, timeline, wrong_results
from tests.faults.conftest import Recorder
from tests.pool import shops_on, start_workers

SHARDS = 3
JOBS = 10_000
TIMEOUT_S = 0.5
DOWN_S = 1.0
RATE = 400  # calls/s offered; below what the pool serves here, so a backlog means a fault


@pytest.fixture(scope="module")
def durable_redis() -> Iterator[EmbeddedRedis]:
    """Redis with AOF on, as deployed (docker-compose.yml): deployments outlive a restart."""
    with EmbeddedRedis(appendonly=True) as server:
        yield server


def test_redis_killed_and_restarted_mid_load(durable_redis: EmbeddedRedis, reliability: Recorder) -> None:
    """Every caller is answered by its deadline + 50 ms, none hangs, the workers reconnect by
    themselves and throughput returns within 5 s of Redis coming back."""
    settings = Settings(redis_url=durable_redis.url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS)
    registry = Registry(redis.Redis.from_url(settings.redis_url), settings, Sandbox())
    registry.define_extension_point("test")
    shops = [shop for shard in range(SHARDS) for shop in shops_on(shard, SHARDS, 4)]
    for shop in shops:
        registry.deploy("test", shop, guests.ECHO)
    plan = [Planned("test", shops[i % len(shops)], {"i": i}, {"i": i}) for i in range(JOBS)]

    workers = start_workers(settings, {f"r{shard}": [shard] for shard in range(SHARDS)})
    pids = [w.process.pid for w in workers]
    try:
        with Client(settings, breaker=BreakerPolicy()) as client:
            load = Load(client, plan, threads=8, timeout_s=TIMEOUT_S, rate=RATE).start()
            load.wait_for(JOBS // 4)
            killed_at = time.monotonic()
            durable_redis.stop(kill=True)
            time.sleep(DOWN_S)
            durable_redis.start()
            back_at = time.monotonic()
            calls = load.join()
            finished_at = time.monotonic()
        died = sum(not w.alive for w in workers)
        assert died == 0 and [w.process.pid for w in workers] == pids
    finally:
        for worker in workers:
            worker.stop()

    worst_late_ms = max(c.late_ms for c in calls)
    try:
        recovered_s = recovery_s(calls, back_at)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{timeline(calls, back_at)}") from None
    assert len(calls) == JOBS
    assert not wrong_results(plan, calls)
    assert worst_late_ms <= 50, f"a caller waited {worst_late_ms:.1f} ms past its deadline"
    assert recovered_s <= 5.0
    served_after = {c.worker.split("@")[0] for c in calls if c.started > back_at and c.worker}
    assert served_after == {w.name for w in workers}  # every worker reconnected and served again

    reliability(
        1,
        "Redis killed and restarted",
        load=f"{JOBS:,} jobs offered at {RATE}/s by 8 caller threads, {len(shops)} shops over "
        f"{SHARDS} shards (one solo worker each), deadline {TIMEOUT_S * 1000:.0f} ms, Redis with AOF",
        fault=f"SIGKILL redis-server after {JOBS // 4:,} jobs, restart it {DOWN_S:.0f} s later",
        asserted="every caller answered by deadline + 50 ms; no caller hangs; no wrong result; "
        "same worker processes serve every shard after; throughput back within 5 s",
        figures={
            **answered_figures(calls, JOBS),
            "Redis down (s)": round(back_at - killed_at, 2),
            "throughput back after (s)": round(recovered_s, 2),
            "worker processes died": died,
            "load duration (s)": round(finished_at - load.began, 1),
        },
    )
