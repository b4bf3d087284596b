"""Scenario 8: the primary of a Sentinel set is SIGKILLed while 10,000 jobs run and deploys keep
coming; the sentinels promote the replica and everything follows it by itself."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from scriptpool.config import Settings
from scriptpool.config.errors import BrokerUnavailable, NotReplicated
from scriptpool.producer import BreakerPolicy, Client
from scriptpool.registry import Registries
from scriptpool.testing import EmbeddedSentinelSet
from tests import guests
from tests.conftest import TEST_ARTIFACT_KEY
from tests.faults._load import Load, Planned, answered_figures, recovery_s, timeline, wrong_results
from tests.faults.conftest import Recorder
from tests.pool import shops_on, start_workers

SHARDS = 2
JOBS = 10_000
RATE = 600  # calls/s offered: below what the pool serves here, so a backlog means a fault
TIMEOUT_S = 0.5
DOWN_AFTER_MS = 1000
DEPLOY_EVERY_S = 0.1
DEPLOY_WAIT_MS = 1000


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[EmbeddedSentinelSet]:
    """3 sentinels (quorum 2), a primary and one replica, on loopback."""
    with EmbeddedSentinelSet(replicas=1, sentinels=3, down_after_ms=DOWN_AFTER_MS) as found:
        yield found


class Deployer:
    """Deploys to a new shop every ``DEPLOY_EVERY_S``, durably (WAIT 1), and records the outcome
    of each: acknowledged, refused as not replicated, or refused as unreachable."""

    def __init__(self, registries: Registries) -> None:
        self.registries = registries
        self.acknowledged: list[tuple[str, float]] = []
        self.not_replicated: list[tuple[str, float]] = []
        self.unreachable: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Deployer:
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            shop = f"deployed.{n}"
            try:
                with self.registries.on_shop(shop, what=f"deploy {n}", again="deploy again") as registry:
                    registry.deploy("test", shop, guests.ECHO)
                self.acknowledged.append((shop, time.monotonic()))
            except NotReplicated:
                self.not_replicated.append((shop, time.monotonic()))
            except BrokerUnavailable:
                self.unreachable.append((shop, time.monotonic()))
            self._stop.wait(DEPLOY_EVERY_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_sentinel_primary_sigkilled_mid_load(
    sentinel_set: EmbeddedSentinelSet, reliability: Recorder
) -> None:
    """Every caller is answered by its deadline + 50 ms; workers and clients reach the promoted
    replica without a restart; throughput returns; no acknowledged deploy is lost."""
    settings = Settings(
        redis_url=sentinel_set.url,
        artifact_key=TEST_ARTIFACT_KEY,
        shards=SHARDS,
        deploy_wait_ms=DEPLOY_WAIT_MS,
    )
    assert settings.deploy_replicas_for(settings.redis_url) == 1  # the default behind Sentinel
    registries = Registries(settings)
    registries.everywhere(lambda r: r.define_extension_point("test"), what="ep test", again="define again")
    shops = [shop for shard in range(SHARDS) for shop in shops_on(shard, SHARDS, 4)]
    for shop in shops:
        with registries.on_shop(shop, what=f"deploy {shop}", again="deploy again") as registry:
            registry.deploy("test", shop, guests.ECHO)
    plan = [Planned("test", shops[i % len(shops)], {"i": i}, {"i": i}) for i in range(JOBS)]

    workers = start_workers(settings, {f"f{shard}": [shard] for shard in range(SHARDS)})
    pids = [w.process.pid for w in workers]
    old_primary = sentinel_set.primary_port()
    try:
        with Client(settings, breaker=BreakerPolicy()) as client:
            load = Load(client, plan, threads=8, timeout_s=TIMEOUT_S, rate=RATE).start()
            deployer = Deployer(registries).start()
            load.wait_for(JOBS // 4)
            killed_at = time.monotonic()
            sentinel_set.kill(old_primary)
            new_primary = sentinel_set.wait_for_new_primary(old_primary, timeout_s=20)
            switched_at = time.monotonic()
            calls = load.join()
            deployer.stop()
            finished_at = time.monotonic()
        died = sum(not w.alive for w in workers)
        assert died == 0 and [w.process.pid for w in workers] == pids
    finally:
        for worker in workers:
            worker.stop()

    worst_late_ms = max(c.late_ms for c in calls)
    try:
        back_after_switch = recovery_s(calls, switched_at)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{timeline(calls, killed_at)}") from None
    first_ok = min(c.finished for c in calls if c.status == "ok" and c.started > killed_at)
    assert len(calls) == JOBS
    assert not wrong_results(plan, calls)
    assert worst_late_ms <= 50, f"a caller waited {worst_late_ms:.1f} ms past its deadline"
    assert back_after_switch <= 5.0, timeline(calls, killed_at)
    served_after = {c.worker.split("@")[0] for c in calls if c.started > switched_at + 1 and c.worker}
    assert served_after == {w.name for w in workers}  # every worker follows the promoted replica

    # Deploys: every acknowledged one is on the promoted replica; those made after the failover,
    # with no replica left to acknowledge them, were refused as not replicated, yet are live.
    keys = settings.keys
    with sentinel_set.data_client(new_primary) as promoted:
        before_kill = [shop for shop, at in deployer.acknowledged if at < killed_at]
        lost = [shop for shop, _ in deployer.acknowledged if not promoted.exists(keys.binding("test", shop))]
        after = [shop for shop, at in deployer.not_replicated if at > switched_at]
        live_unacknowledged = sum(1 for shop in after if promoted.exists(keys.binding("test", shop)))
    acknowledged_after = [shop for shop, at in deployer.acknowledged if at > switched_at]
    assert before_kill and not lost, f"acknowledged deploys lost: {lost}"
    assert after and not acknowledged_after  # no replica: nothing after the failover is acknowledged
    assert live_unacknowledged == len(after)  # exactly what NotReplicated says: live, not durable

    reliability(
        8,
        "Sentinel: primary SIGKILLed, replica promoted",
        load=f"{JOBS:,} jobs offered at {RATE}/s by 8 caller threads, {len(shops)} shops over {SHARDS} "
        f"shards (one solo worker each), deadline {TIMEOUT_S * 1000:.0f} ms, all through one "
        f"sentinel:// URL (3 sentinels, quorum 2, a primary and one replica, down-after "
        f"{DOWN_AFTER_MS} ms); a deploy to a new shop every {DEPLOY_EVERY_S * 1000:.0f} ms, each "
        f"acknowledged only after WAIT 1 {DEPLOY_WAIT_MS}",
        fault=f"SIGKILL the primary's redis-server after {JOBS // 4:,} jobs; it stays down",
        asserted="every caller answered by deadline + 50 ms; no caller hangs; no wrong result; the same "
        "worker processes and client serve every shard after the promotion; throughput back within "
        "5 s of the switch; every acknowledged deploy on the promoted replica; deploys after it "
        "(no replica left) refused with not_replicated and live on the primary",
        figures={
            **answered_figures(calls, JOBS),
            "SIGKILL to +switch-master, as the sentinels report it (s)": round(switched_at - killed_at, 2),
            "first ok call after the kill (s)": round(first_ok - killed_at, 2),
            "throughput back after the switch (s)": round(back_after_switch, 2),
            "throughput back after the kill (s)": round(back_after_switch + switched_at - killed_at, 2),
            "deploys acknowledged before the kill / after / lost": (
                f"{len(before_kill)} / {len(deployer.acknowledged) - len(before_kill)} / {len(lost)}"
            ),
            "deploys refused as unreachable (no primary yet)": len(deployer.unreachable),
            "deploys after the switch refused as not_replicated / live anyway": (
                f"{len(after)} / {live_unacknowledged}"
            ),
            "worker processes restarted": died,
            "load duration (s)": round(finished_at - load.began, 1),
        },
    )
