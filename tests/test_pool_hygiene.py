"""No leaks: no keys or pub/sub channels left per call, and waits survive a Redis restart."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from scriptpool.config import Keys, Settings, shard_for
from scriptpool.engine import Sandbox
from scriptpool.producer import Client
from scriptpool.registry import Registry
from scriptpool.testing import EmbeddedRedis
from tests import guests
from tests.pool import WorkerProcess, pool_fixtures

# Every key that may outlive a call, with whether it is permanent (no TTL). Anything else is a leak.
PERMANENT = [
    r"sp:module:\w+",
    r"sp:artifact:\w+:\w+",
    r"sp:binding:\w+:\w+",
    r"sp:history:\w+:\w+",
    r"sp:ep:\w+",
    r"sp:eps",
    r"_kombu\.binding(\.|_deadlines|_permanent\.).*",
]  # and no "unacked" hash: kombu's ack emulation is off (scriptpool.workers._app)
EXPIRING = [r"sp:reply:\w+", r"sp:worker:.+"]  # reply lists (60 s), worker heartbeats (10 s)
# Usage, per shop and minute, and the shops of each minute: kept for the usage retention.
RETAINED = [r"sp:usage:\w+:\d+", r"sp:usage-shops:\d+"]


@pytest.fixture(scope="module")
def private_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


settings, workers = pool_fixtures(2, {"h0": [0], "h1": [1]}, redis="private_redis", settings="settings")


def deploy(settings: Settings, shops: list[str]) -> None:
    registry = Registry(redis.Redis.from_url(settings.redis_url), settings, Sandbox())
    # A wall-clock limit no stall of a loaded machine reaches: this test counts keys, and a
    # worker starved of CPU past the default 100 ms would fail a run for nothing it checks.
    registry.define_extension_point("test", limits={"wall_ms": 10_000})
    for shop in shops:
        registry.deploy("test", shop, guests.ECHO)


def test_no_keys_or_channels_leak_after_10000_calls(
    settings: Settings, workers: dict[str, WorkerProcess]
) -> None:
    """After 10,000 calls from 16 threads, Redis holds only the documented keys and channels."""
    shops = ["101", "202", "303", "404"]
    deploy(settings, shops)
    client_redis = redis.Redis.from_url(settings.redis_url)
    with Client(settings) as client:
        failures: list[object] = []

        def caller(worker_index: int) -> None:
            for i in range(625):
                outcome = client.run("test", shops[i % 4], {"i": i}, timeout=10)
                if not outcome.ok or outcome.output != {"i": i}:
                    failures.append(outcome)

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        assert sum(link.replies.pending() for link in client._groups) == 0
        keys = sorted(k.decode() for k in client_redis.keys("*"))
        for key in keys:
            if any(re.fullmatch(p, key) for p in EXPIRING):
                assert 0 < client_redis.ttl(key) <= Keys.REPLY_TTL_S, key
            elif any(re.fullmatch(p, key) for p in RETAINED):
                assert 0 < client_redis.ttl(key) <= settings.usage_retention_s + 60, key
            else:
                assert any(re.fullmatch(p, key) for p in PERMANENT), f"unexpected key {key}"
        assert len(keys) < 30
        channels = sorted(c.decode() for c in client_redis.pubsub_channels())
        assert channels == [settings.keys.invalidations()]
        # One fixed pattern: each worker's remote-control (pidbox) fanout, which Flower uses.
        patterns = [c for c in client_redis.client_list() if int(c.get("psub", 0))]
        assert client_redis.pubsub_numpat() <= 1
        assert all(int(c["psub"]) == 1 for c in patterns)


def test_wait_during_redis_restart_returns_fallback_at_deadline_and_workers_reconnect(
    settings: Settings, workers: dict[str, WorkerProcess], private_redis: EmbeddedRedis
) -> None:
    """A caller waiting while Redis restarts gets its fallback at the deadline, and the pool
    serves again afterwards without restarting any worker."""
    shop = next(str(n) for n in range(1000) if shard_for(str(n), 2) == 0)
    deploy(settings, [shop])
    with Client(settings) as client:
        assert client.run("test", shop, {"warm": 1}, timeout=5).ok
        # Queue the next job behind a slow one, so it is still waiting when Redis goes away.
        results: dict[str, object] = {}

        def waiter() -> None:
            started = time.perf_counter()
            results["outcome"] = client.run("test", shop, {"w": 1}, timeout=0.5, fallback="fb")
            results["elapsed"] = time.perf_counter() - started

        thread = threading.Thread(target=waiter)
        private_redis.stop(kill=True)
        thread.start()
        time.sleep(0.1)
        private_redis.start()
        thread.join()
        outcome = results["outcome"]
        assert outcome.status == "fallback"  # type: ignore[attr-defined]
        assert results["elapsed"] < 0.5 + 0.05  # type: ignore[operator]

        deploy(settings, [shop])  # no persistence in this Redis: deploy again
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            outcome = client.run("test", shop, {"back": 1}, timeout=1)
            if outcome.ok:
                break
        assert outcome.ok and outcome.output == {"back": 1}  # type: ignore[attr-defined]
        assert all(w.alive for w in workers.values())
