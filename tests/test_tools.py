"""``demo`` and ``bench`` never write into a user's Redis unless asked (``--external``), and
then only under names of their own that they remove again."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis

from scriptpool.config import Settings, shard_for
from scriptpool.engine import Sandbox
from scriptpool.registry import Registry
from scriptpool.testing import EmbeddedRedis
from tests import guests
from tests.conftest import ROOT, TEST_ARTIFACT_KEY
from tests.pool import WorkerProcess, pool_fixtures

SHARDS = 2
# What running workers keep changing by themselves: heartbeats, and kombu's queue bindings.
LIVE_KEYS = (b"sp:worker:", b"_kombu.")


@pytest.fixture(scope="module")
def users_redis() -> Iterator[EmbeddedRedis]:
    """The user's own Redis, holding the user's own deployment."""
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS)
        registry = Registry(redis.Redis.from_url(server.url), settings, Sandbox())
        registry.define_extension_point("discount", limits={"fuel": 5_000_000})
        registry.deploy("discount", "1000", guests.writes(b'{"discounts":["mine"]}'))
        yield server


def snapshot(url: str) -> dict[bytes, str]:
    """Every key that is not a running worker's, with a digest of its value."""
    client = redis.Redis.from_url(url)
    found = {}
    for key in client.scan_iter(count=1000):
        if key.startswith(LIVE_KEYS):
            continue
        dumped = client.dump(key) or b""
        found[key] = hashlib.sha256(dumped).hexdigest()
    return found


def run_tool(argv: list[str], url: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "SCRIPTPOOL_REDIS_URL": url,
        "SCRIPTPOOL_ARTIFACT_KEY": TEST_ARTIFACT_KEY.decode(),
        "SCRIPTPOOL_SHARDS": str(SHARDS),
        "SCRIPTPOOL_METRICS_PORT": "9",  # a private pool must not inherit it (two workers, one port)
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "scriptpool", *argv],
        env=environment, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_demo_uses_a_private_redis_unless_told_otherwise(users_redis: EmbeddedRedis) -> None:
    """With SCRIPTPOOL_REDIS_URL set, ``demo`` still runs on a Redis of its own, with workers of
    its own: the user's Redis is byte for byte what it was."""
    before = snapshot(users_redis.url)
    result = run_tool(["demo"], users_redis.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting a private Redis" in result.stdout
    assert snapshot(users_redis.url) == before


users_settings, users_workers = pool_fixtures(
    SHARDS, {"user0": [0], "user1": [1]}, redis="users_redis", settings="users_settings"
)


@pytest.mark.slow
def test_external_demo_and_bench_leave_nothing_behind(
    users_redis: EmbeddedRedis, users_workers: dict[str, WorkerProcess]
) -> None:
    """``demo --external`` and ``bench --external`` run on the user's pool under names of their
    own: the user's EP keeps its override, its binding stays, and afterwards every key is what it
    was (no EPs, bindings, modules, reply lists or ``celery-task-meta-*`` left)."""
    before = snapshot(users_redis.url)
    demo = run_tool(["demo", "--external"], users_redis.url)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "demo-" in demo.stdout  # its own EP and shop names
    bench = run_tool(
        ["bench", "--external", "--n", "20", "--serial", "10", "--references", "10", "--json"],
        users_redis.url,
    )
    assert bench.returncode == 0, bench.stdout + bench.stderr
    after = snapshot(users_redis.url)
    assert after == before, {
        "added": sorted(set(after) - set(before)),
        "changed": sorted(k for k in before if after.get(k) != before[k]),
    }
    client = redis.Redis.from_url(users_redis.url)
    assert not list(client.scan_iter(match="celery-task-meta-*"))
    # The user's own script still serves, through the same workers.
    registry = Registry(client, Settings(redis_url=users_redis.url, shards=SHARDS), Sandbox())
    assert registry.extension_point("discount").limit_overrides == {"fuel": 5_000_000}
    assert shard_for("1000", SHARDS) in (0, 1) and registry.binding("discount", "1000").version == 1
