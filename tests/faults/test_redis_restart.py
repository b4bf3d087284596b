"""Scenario 1: Redis is killed and restarted while 10,000 jobs run over three shards."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from scriptpool.config import Settings
from scriptpool.testing import EmbeddedRedis, make_registry
from tests import guests
from tests.conftest import TEST_ARTIFACT_KEY
from tests.faults._load import Planned, answered_figures, under_load
from tests.faults.conftest import Recorder
from tests.pool import shops_on

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
    shops = [shop for shard in range(SHARDS) for shop in shops_on(shard, SHARDS, 4)]
    make_registry(settings, deploy={("test", shop): guests.ECHO for shop in shops})
    plan = [Planned("test", shops[i % len(shops)], {"i": i}, {"i": i}) for i in range(JOBS)]

    layout = {f"r{shard}": [shard] for shard in range(SHARDS)}
    with under_load(settings, plan, layout, rate=RATE, timeout_s=TIMEOUT_S, break_after=JOBS // 4) as run:
        killed_at = time.monotonic()
        durable_redis.stop(kill=True)
        time.sleep(DOWN_S)
        durable_redis.start()
        back_at = run.cleared()
    calls = run.calls

    # No wrong result, every caller by its deadline + 50 ms, the same worker processes alive,
    # throughput back within 5 s, and a good script on every shop right after.
    recovered_s = run.assert_recovered(within_s=5.0)
    assert recovered_s is not None
    died = sum(not alive for alive in run.alive.values())
    served_after = {c.worker.split("@")[0] for c in calls if c.started > back_at and c.worker}
    assert served_after == set(layout)  # every worker reconnected and served again

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
            "load duration (s)": round(run.finished_at - run.load.began, 1),
        },
    )
