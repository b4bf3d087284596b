"""Scenario 9: two shard groups on two Redis primaries; group A's Redis is killed under load on
both, and group B's callers do not notice."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator

import pytest

from scriptpool.cli import main
from scriptpool.config import Settings
from scriptpool.producer import BreakerPolicy, Client
from scriptpool.registry import Registries
from scriptpool.testing import EmbeddedRedis
from tests import guests
from tests.conftest import TEST_ARTIFACT_KEY
from tests.faults._load import Call, Load, Planned, answered_figures, recovery_s, timeline, wrong_results
from tests.faults.conftest import Recorder
from tests.pool import shops_on, start_workers

SHARDS = 2  # shard 0 in group A, shard 1 in group B
JOBS = 5_200
RATE = 400
TIMEOUT_S = 0.5
DOWN_S = 3.0


@pytest.fixture(scope="module")
def two_redis() -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis]]:
    """Group A's and group B's Redis, with AOF (as deployed): a restart keeps the bindings."""
    with EmbeddedRedis(appendonly=True) as a, EmbeddedRedis(appendonly=True) as b:
        yield a, b


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def test_killing_one_groups_redis_leaves_the_other_group_fully_served(
    two_redis: tuple[EmbeddedRedis, EmbeddedRedis],
    reliability: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """B's calls are all correct and as fast as before while A's Redis is down, B's breakers stay
    closed; A's callers fall back by their deadline and recover once A's Redis is back."""
    redis_a, redis_b = two_redis
    groups = f"0={redis_a.url};1={redis_b.url}"
    settings = Settings(artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS, shard_groups=groups)
    assert [g.url for g in settings.groups] == [redis_a.url, redis_b.url]
    registries = Registries(settings)
    registries.everywhere(lambda r: r.define_extension_point("test"), what="ep test", again="define again")
    shops_a, shops_b = shops_on(0, SHARDS, 4), shops_on(1, SHARDS, 4)
    for shop in shops_a + shops_b:
        with registries.on_shop(shop, what=f"deploy {shop}", again="deploy again") as registry:
            registry.deploy("test", shop, guests.ECHO)
    interleaved = [shop for pair in zip(shops_a, shops_b, strict=True) for shop in pair]
    plan = [Planned("test", interleaved[i % 8], {"i": i}, {"i": i}) for i in range(JOBS)]
    in_a = set(shops_a)

    workers = start_workers(settings, {"ga": [0], "gb": [1]})
    pids = [w.process.pid for w in workers]
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    breaker_samples: list[tuple[int, int]] = []  # (A shops open, B shops open) during the outage
    assert main(["status", "--json"]) == 0  # both groups up (and the CLI's imports are done)
    try:
        with Client(settings, breaker=BreakerPolicy()) as client:
            load = Load(client, plan, threads=8, timeout_s=TIMEOUT_S, rate=RATE).start()
            load.wait_for(JOBS // 4)
            killed_at = time.monotonic()
            redis_a.stop(kill=True)
            capsys.readouterr()
            status_code = main(["status", "--json"])
            status = json.loads(capsys.readouterr().out)
            # The status command ran in this process, so B's latency is measured from here on.
            measured_from = time.monotonic()
            while time.monotonic() < killed_at + DOWN_S:
                breaker_samples.append(
                    (
                        sum(client.breaker_state(shop, "test") != "closed" for shop in shops_a),
                        sum(client.breaker_state(shop, "test") != "closed" for shop in shops_b),
                    )
                )
                time.sleep(0.05)
            redis_a.start()
            back_at = time.monotonic()
            calls = load.join()
        assert [w.process.pid for w in workers] == pids and all(w.alive for w in workers)
    finally:
        for worker in workers:
            worker.stop()

    def of_b(call: Call) -> bool:
        return plan[call.index].shop not in in_a

    b_calls = [c for c in calls if of_b(c)]
    a_calls = [c for c in calls if not of_b(c)]
    b_before = [c.elapsed_ms for c in b_calls if c.finished < killed_at]
    b_during = [c.elapsed_ms for c in b_calls if measured_from <= c.started and c.finished < back_at]
    a_during = [c for c in a_calls if killed_at + 0.1 <= c.started and c.finished < back_at]
    base_p50, base_p95 = _percentile(b_before, 50), _percentile(b_before, 95)
    down_p50, down_p95 = _percentile(b_during, 50), _percentile(b_during, 95)
    try:
        a_back = recovery_s(a_calls, back_at)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{timeline(a_calls, killed_at)}") from None

    assert len(calls) == JOBS and not wrong_results(plan, calls)
    assert max(c.late_ms for c in calls) <= 50
    assert all(c.status == "ok" for c in b_calls), timeline(
        [c for c in b_calls if c.status != "ok"], killed_at
    )
    # Not a bound on this machine's speed: these 2 cores are shared with A's failing callers, the
    # status command and, in CI, whatever else runs (one run's B p50 moved from 1.8 to 12 ms
    # beside another suite, with nothing failing). What isolation rules out is a B call waiting
    # on anything of A's: A's deadline (500 ms) or socket timeout (1 s), or a fallback. So B's
    # p50 stays under a quarter of that deadline and its p95 under half.
    assert down_p50 < TIMEOUT_S * 1000 / 4, (base_p50, down_p50)
    assert down_p95 < TIMEOUT_S * 1000 / 2, (base_p95, down_p95)
    assert max(b_during) < TIMEOUT_S * 1000, max(b_during)
    assert breaker_samples and max(b for _, b in breaker_samples) == 0  # B's breakers never open
    assert max(a for a, _ in breaker_samples) > 0  # A's do: its callers get circuit_open at once
    assert a_during and all(c.status == "fallback" for c in a_during)
    assert a_back <= 5.0
    assert status_code == 4  # a group unreachable
    reachable = {g["group"]: g["reachable"] for g in status["groups"]}
    assert reachable == {"0": False, "1": True}
    assert [row["workers"] for row in status["shard_table"]] == [[], ["gb@test"]]

    codes_a = sorted({str(c.error_code) for c in a_during})
    reliability(
        9,
        "Shard groups: one group's Redis killed",
        load=f"{JOBS:,} jobs offered at {RATE}/s by 8 caller threads to 4 shops of group A (shard 0, "
        f"its own Redis) and 4 of group B (shard 1, another Redis), interleaved; one solo worker per "
        f"shard; one Client; deadline {TIMEOUT_S * 1000:.0f} ms",
        fault=f"SIGKILL group A's Redis after {JOBS // 4:,} jobs; restart it (AOF) {DOWN_S:.0f} s later",
        asserted="every B call ok; B's p50 under a quarter of the deadline and p95 under half (no B "
        "call waits on A's deadline or socket timeout), none as slow as the deadline; B's breakers "
        "never open, A's do; every A call "
        "during the outage falls back by its deadline + 50 ms; A's throughput back within 5 s of the "
        "restart; status names group A unreachable (exit 4) and shard 1 served",
        figures={
            **answered_figures(calls, JOBS),
            "B calls ok": f"{sum(c.status == 'ok' for c in b_calls):,} of {len(b_calls):,}",
            "B p50 before / while A is down (ms)": f"{base_p50:.2f} / {down_p50:.2f}",
            "B p95 before / while A is down (ms)": f"{base_p95:.2f} / {down_p95:.2f}",
            "slowest B call while A is down (ms)": round(max(b_during), 2),
            "B breakers open, most seen at once": max(b for _, b in breaker_samples),
            "A breakers open, most seen at once (of 4)": max(a for a, _ in breaker_samples),
            "A calls during the outage: fallbacks": f"{len(a_during):,} ({', '.join(codes_a)})",
            "A throughput back after the restart (s)": round(a_back, 2),
        },
    )
