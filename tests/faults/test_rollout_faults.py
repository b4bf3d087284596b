"""Scenario 11: rollouts under load while a worker is SIGKILLed and Redis is restarted (AOF)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from scriptpool.config import Settings
from scriptpool.engine import Sandbox
from scriptpool.producer import BreakerPolicy, Client
from scriptpool.registry import ABORTED, PROMOTED, SHADOWING, Registry, RolloutRules
from scriptpool.testing import EmbeddedRedis
from tests import guests
from tests.conftest import TEST_ARTIFACT_KEY
from tests.faults._load import Load, Planned, answered_figures, recovery_s, wrong_results
from tests.faults.conftest import Recorder
from tests.pool import shops_on, start_workers

SHARDS = 2
JOBS = 6_000
RATE = 300
TIMEOUT_S = 0.5
DOWN_S = 1.0
PROMOTE_AFTER = 1_200  # more than a shop's calls during the load: promotion comes after the faults


@pytest.fixture(scope="module")
def durable_redis() -> Iterator[EmbeddedRedis]:
    """Redis with AOF as in docker-compose.yml (``appendfsync everysec``)."""
    with EmbeddedRedis(appendonly=True, appendfsync="everysec") as server:
        yield server


def _integral(counts: dict[str, float]) -> bool:
    return counts["compared"] == counts["match"] + counts["mismatch"] + counts["candidate_error"]


def test_rollouts_under_load_with_a_worker_killed_and_redis_restarted(
    durable_redis: EmbeddedRedis, reliability: Recorder
) -> None:
    """Four shops shadow an identical candidate, a fifth one that disagrees on some inputs. One of
    shard 0's two workers is SIGKILLed mid-load (mid-shadow: shadow runs follow every call), then
    Redis is SIGKILLed and restarted. Every caller is answered by its deadline + 50 ms with the
    right output; no caller got a candidate before its promotion, nor the aborted one's ever;
    every count adds up before and after each fault; the restart keeps every rollout's state;
    the four are promoted once their comparisons are in."""
    settings = Settings(redis_url=durable_redis.url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS)
    registry = Registry(redis.Redis.from_url(settings.redis_url), settings, Sandbox())
    registry.define_extension_point("test")
    same, differs = shops_on(0, SHARDS, 3) + shops_on(1, SHARDS, 1), shops_on(0, SHARDS, 1, skip=3)[0]
    shops = [*same, differs]
    for shop in shops:
        registry.deploy("test", shop, guests.ECHO)
    candidate_sha = {
        shop: registry.start_rollout(
            "test", shop, guests.echo(burn=10), RolloutRules(promote_after=PROMOTE_AFTER)
        ).deployment["sha256"]
        for shop in same
    }
    # {"i":5...} and up disagree: the first such input aborts it (mismatch rate 0).
    aborted_sha = registry.start_rollout(
        "test", differs, guests.digit_gate(5), RolloutRules(promote_after=PROMOTE_AFTER)
    ).deployment["sha256"]
    plan = [Planned("test", shops[i % len(shops)], {"i": i}, {"i": i}) for i in range(JOBS)]

    workers = start_workers(settings, {"ro0a": [0], "ro0b": [0], "ro1": [1]})
    victim = workers[0]
    wall_offset = time.time() - time.monotonic()
    try:
        with Client(settings, breaker=BreakerPolicy()) as client:
            load = Load(client, plan, threads=8, timeout_s=TIMEOUT_S, rate=RATE).start()
            load.wait_for(JOBS // 3)
            victim.kill()
            load.wait_for(2 * JOBS // 3)
            before_restart = {shop: registry.rollouts.status("test", shop) for shop in same}
            durable_redis.stop(kill=True)
            time.sleep(DOWN_S)
            durable_redis.start()
            back_at = time.monotonic()
            after_restart = {shop: registry.rollouts.status("test", shop) for shop in same}
            calls = load.join()
            at_end = {shop: registry.rollouts.status("test", shop) for shop in same}
            # More calls, serially, until every comparison is in.
            extra, deadline = 0, time.monotonic() + 60
            while time.monotonic() < deadline:
                states = {registry.rollouts.status("test", shop).state for shop in same}
                if states == {PROMOTED}:
                    break
                for shop in same:
                    outcome = client.run("test", shop, {"extra": extra}, timeout=2)
                    assert outcome.ok and outcome.output == {"extra": extra}, outcome.error
                    extra += 1
        survivors_alive = all(w.alive for w in workers[1:])
    finally:
        for worker in workers:
            worker.kill()

    final = {shop: registry.rollouts.status("test", shop) for shop in same}
    aborted = registry.rollouts.status("test", differs)
    assert len(calls) == JOBS and not wrong_results(plan, calls)
    assert max(c.late_ms for c in calls) <= 50
    assert survivors_alive
    assert aborted.state == ABORTED and aborted.samples and "mismatch" in aborted.reason
    assert not [c for c in calls if c.sha256 == aborted_sha]
    for shop in same:
        assert all(s[shop].state == SHADOWING for s in (before_restart, after_restart, at_end))
        assert all(_integral(s[shop].counts) for s in (before_restart, after_restart, at_end, final))
        # Judges report in batches (of at most 64): promotion comes with the batch that reaches N.
        assert (
            final[shop].state == PROMOTED
            and PROMOTE_AFTER <= final[shop].counts["compared"] < PROMOTE_AFTER + 64 * 3
        )
        assert final[shop].counts["mismatch"] == final[shop].counts["candidate_error"] == 0
        promoted_at = final[shop].counts["ended_at"] - wall_offset
        early = [c for c in calls if c.sha256 == candidate_sha[shop] and c.started < promoted_at]
        assert not early
    # With everysec, a restart may lose up to a second of counts (never a rollout); comparisons
    # counted between the read and the kill make the difference negative.
    lost = {
        shop: max(0.0, before_restart[shop].counts["compared"] - after_restart[shop].counts["compared"])
        for shop in same
    }
    assert all(n <= RATE / len(shops) * 1.5 for n in lost.values()), lost

    reliability(
        11,
        "Rollouts under load; worker killed; Redis restarted",
        load=f"{JOBS:,} jobs at {RATE}/s by 8 caller threads over 5 shops, each mid-rollout (4 with an "
        f"identical candidate, promote after {PROMOTE_AFTER:,}; 1 with one that disagrees), shadow "
        "rate 1.0; two solo workers on shard 0, one on shard 1; Redis with AOF everysec",
        fault=f"SIGKILL a shard-0 worker after {JOBS // 3:,} jobs; SIGKILL redis-server after "
        f"{2 * JOBS // 3:,}, restart it {DOWN_S:.0f} s later",
        asserted="callers answered by deadline + 50 ms with the right output; none served by a "
        "candidate before its promotion or by the aborted one; compared = match + mismatch + "
        "candidate error at every step; every rollout's state survives the restart; the four are "
        "promoted",
        figures={
            **answered_figures(calls, JOBS),
            "comparisons per shop before the Redis kill (median)": sorted(
                int(s.counts["compared"]) for s in before_restart.values()
            )[len(same) // 2],
            "comparisons lost to the restart, per shop (max)": int(max(lost.values())),
            "rollouts still shadowing after the restart": f"{len(same)} of {len(same)}",
            "the disagreeing one: aborted after comparisons": int(aborted.counts["compared"]),
            "throughput back after the restart (s)": round(recovery_s(calls, back_at), 2),
            "serial calls after the load until all were promoted": extra,
        },
    )
