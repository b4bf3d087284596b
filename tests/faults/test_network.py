"""Scenario 3: the network between the workers and Redis turns slow, then black-holes, then heals."""

from __future__ import annotations

import time
from collections import Counter

from scriptpool.config import Settings
from scriptpool.producer import BreakerPolicy
from scriptpool.testing import EmbeddedRedis, make_registry
from tests import guests
from tests.conftest import TEST_ARTIFACT_KEY
from tests.faults._load import Planned, answered_figures, ok_rate, timeline, under_load
from tests.faults._proxy import ProxyProcess
from tests.faults.conftest import Recorder
from tests.pool import shops_on

SHARDS = 2
RATE = 200
TIMEOUT_S = 0.25
LATENCY_S = 0.3  # per chunk, each way: a job's round trip can no longer meet its deadline
PHASE_S = {"baseline": 2.0, "slow": 2.0, "black hole": 3.0, "healed": 6.0}


def test_slow_then_black_holed_network_degrades_to_fallback_and_recovers(
    private_redis: EmbeddedRedis, reliability: Recorder
) -> None:
    """Callers get the fallback by their deadline + 50 ms while the workers' link to Redis is
    slow or black-holed, the breakers open, and after the link heals the same workers serve
    every shard again with no restart."""
    settings = Settings(redis_url=private_redis.url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS)
    shops = shops_on(0, SHARDS, 3) + shops_on(1, SHARDS, 3)
    make_registry(settings, deploy={("test", shop): guests.ECHO for shop in shops})
    total = int(RATE * sum(PHASE_S.values()) * 2)
    plan = [Planned("test", shops[i % len(shops)], {"i": i}, {"i": i}) for i in range(total)]

    proxy = ProxyProcess(private_redis.port)
    # Only the workers go through the proxy; host clients reach Redis directly.
    worker_settings = Settings(redis_url=proxy.url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS)
    layout = {f"n{shard}": [shard] for shard in range(SHARDS)}
    marks: dict[str, float] = {}
    breaker_states: Counter[str] = Counter()
    try:
        with under_load(
            worker_settings,
            plan,
            layout,
            rate=RATE,
            timeout_s=TIMEOUT_S,
            break_after=0,  # the baseline is the first phase
            breaker=BreakerPolicy(error_threshold=5, cooldown_s=1.0),
            client_settings=settings,
        ) as run:
            for phase, seconds in PHASE_S.items():
                marks[phase] = time.monotonic()
                if phase == "slow":
                    proxy.add_latency(LATENCY_S)
                elif phase == "black hole":
                    proxy.black_hole()
                elif phase == "healed":
                    proxy.heal()
                    run.cleared()
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    if phase == "black hole":
                        breaker_states.update(run.client.breaker_state(shop, "test") for shop in shops)
                    time.sleep(0.05)
            run.load.stop()
    finally:
        proxy.close()
    calls, workers = run.calls, run.workers

    healed = marks["healed"]
    # No wrong result, every caller by its deadline + 50 ms, the same worker processes alive,
    # throughput back within 5 s of healing, and a good script on every shop right after.
    recovered_s = run.assert_recovered(within_s=5.0)
    assert recovered_s is not None
    died = sum(not alive for alive in run.alive.values())
    faulty = [c for c in calls if marks["slow"] + TIMEOUT_S < c.started < healed]
    stale_dropped = sum(w.log().count("stale_job_dropped") for w in workers)
    assert sum(1 for c in faulty if c.status == "ok") <= len(faulty) * 0.05, timeline(calls, marks["slow"])
    assert breaker_states["open"] > 0  # the breakers opened during the black hole
    settled = [c for c in calls if c.started > healed + PHASE_S["healed"] - 2.0]
    assert settled and all(c.status == "ok" for c in settled), timeline(calls, healed)
    assert {c.worker.split("@")[0] for c in settled if c.worker} == {w.name for w in workers}

    codes = Counter(str(c.error_code) for c in faulty if c.status != "ok")
    reliability(
        3,
        "Slow, then black-holed network between workers and Redis",
        load=f"{RATE}/s open-loop from 8 caller threads for {sum(PHASE_S.values()):.0f} s, 6 shops over "
        f"{SHARDS} shards (one solo worker each), deadline {TIMEOUT_S * 1000:.0f} ms; workers reach "
        "Redis through a TCP proxy, callers directly",
        fault=f"proxy adds {LATENCY_S * 1000:.0f} ms per chunk each way for {PHASE_S['slow']:.0f} s, then "
        f"holds all traffic for {PHASE_S['black hole']:.0f} s, then heals",
        asserted="every caller answered by deadline + 50 ms; ≤ 5 % ok while faulty; breakers open; "
        "throughput back within 5 s of healing; last 2 s all ok on the same worker processes",
        figures={
            **answered_figures(calls, len(calls)),
            "ok rate before / during / after fault (per s)": " / ".join(
                f"{ok_rate(calls, a, b):.0f}"
                for a, b in (
                    (marks["baseline"], marks["slow"]),
                    (marks["slow"], healed),
                    (healed + recovered_s, healed + PHASE_S["healed"]),
                )
            ),
            "while faulty: fallbacks by code": ", ".join(f"{k} {v:,}" for k, v in sorted(codes.items())),
            "breaker samples open during black hole": f"{breaker_states['open']} of {breaker_states.total()}",
            "throughput back after healing (s)": round(recovered_s, 2),
            "stale jobs dropped by workers after healing": stale_dropped,
            "worker processes died": died,
        },
    )
