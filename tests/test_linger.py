"""A solo worker that has nothing to run waits for its queues' next messages itself (a BLMPOP,
``scriptpool.workers._serve.LINGER_S``), so back-to-back calls skip Celery's dispatch. What that
must not cost: a worker of several shards serves every one of them while one has a steady
caller, and a pool other than solo never lingers (its consumer would hold the next message for
a process that is waiting on the queue itself)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scriptpool import Client, Registry, Settings
from scriptpool.testing import worker_argv
from scriptpool.workers._serve import LINGER_S
from tests import guests
from tests.conftest import deployer_fixture
from tests.pool import pool_fixtures, shops_on, worker_env

SHARDS = 3
A = shops_on(0, SHARDS, 1, prefix="linger")[0]
B = shops_on(1, SHARDS, 1, prefix="linger")[0]
C = shops_on(2, SHARDS, 1, prefix="linger")[0]

# One worker consumes shards 0 and 1, as `scriptpool worker --shards 0,1` runs it.
pool_settings, workers = pool_fixtures(SHARDS, {"w01": [0, 1]})
deployer = deployer_fixture(after=("workers",))


def test_a_worker_of_two_shards_serves_the_second_beside_a_steady_caller_of_the_first(
    pool_settings: Settings, workers: object, deployer: Registry
) -> None:
    """A caller calls shard 0 again and again (every 20 ms, so the worker always lingers on
    it); calls to shard 1 meanwhile are served, each within its 2 s (the worker waits on both
    queues, the other shard's first), not after the 5 s the worker may keep serving."""
    deployer.deploy("test", A, guests.ECHO)
    deployer.deploy("test", B, guests.ECHO)
    stop = threading.Event()
    steady: list[str] = []
    with Client(pool_settings) as client:
        assert client.run("test", A, {}, timeout=5).ok and client.run("test", B, {}, timeout=5).ok

        def caller() -> None:
            while not stop.is_set():
                steady.append(client.run("test", A, {"x": 1}, timeout=2).status)
                time.sleep(0.02)

        thread = threading.Thread(target=caller)
        thread.start()
        try:
            time.sleep(0.3)
            others = []
            for _ in range(8):
                others.append(client.run("test", B, {"x": 2}, timeout=2))
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join()
    assert [o.status for o in others] == ["ok"] * 8, [(o.status, o.error_code) for o in others]
    assert steady and set(steady) == {"ok"}


@pytest.fixture
def prefork_worker(pool_settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A prefork worker with one child, on shard 2."""
    logfile = tmp_path / "prefork.log"
    argv = worker_argv(pool_settings, [2], name="linger-prefork@test", pool="prefork")
    process = subprocess.Popen(
        [*argv, "--concurrency", "1", "--logfile", str(logfile)],
        env=worker_env(pool_settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while " ready." not in (logfile.read_text() if logfile.exists() else ""):
            assert process.poll() is None and time.monotonic() < deadline, "the prefork worker did not start"
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_a_prefork_child_does_not_linger(
    pool_settings: Settings, workers: object, deployer: Registry, prefork_worker: subprocess.Popen[bytes]
) -> None:
    """Twenty back-to-back calls through a prefork worker with one child take far less than
    twenty lingers: Celery's consumer, which has taken the next message already, is not kept
    waiting for a child that lingers on the queue (which cost each call a whole LINGER_S)."""
    deployer.deploy("test", C, guests.ECHO)
    with Client(pool_settings) as client:
        for _ in range(3):
            assert client.run("test", C, {}, timeout=10).ok
        started = time.monotonic()
        outcomes = [client.run("test", C, {"n": n}, timeout=10) for n in range(20)]
        elapsed = time.monotonic() - started
    assert [o.status for o in outcomes] == ["ok"] * 20
    assert elapsed < 10 * LINGER_S, f"20 calls took {elapsed:.2f} s: each waited out a linger"
