"""A worker's life as an operator sees it: it refuses to start when its name or metrics port is
taken, it leaves at once when stopped, it says which shard count it runs with, and Flower lists
it when it sends events."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import redis

from scriptpool.cli import main
from scriptpool.config import Settings
from scriptpool.producer import Client
from scriptpool.testing import free_port
from tests.conftest import ROOT, TEST_ARTIFACT_KEY
from tests.logs import captured_events
from tests.pool import WorkerProcess, worker_env

SHARDS = 2


@pytest.fixture
def pool_settings(redis_url: str, redis_client: redis.Redis) -> Settings:
    """Settings on the flushed test Redis (each test starts its own workers)."""
    return Settings(redis_url=redis_url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS)


def wait_until(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_a_metrics_port_that_cannot_be_opened_stops_the_worker(pool_settings: Settings) -> None:
    """The CLI refuses a port in use in one line (exit 2); the worker process itself refuses it
    too (plain ``celery worker`` with SCRIPTPOOL_METRICS_PORT), exits 2 and leaves no heartbeat."""
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**worker_env(pool_settings), "SCRIPTPOOL_METRICS_PORT": str(port)}
        result = subprocess.run(
            [sys.executable, "-m", "scriptpool", "worker", "--shards", "0"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"scriptpool: configuration_error: cannot serve metrics on port {port}: Address already in use"
        ]
        worker = WorkerProcess(pool_settings, [0], "portless", {"SCRIPTPOOL_METRICS_PORT": str(port)})
        assert worker.process.wait(timeout=60) == 2
    assert "worker_refused_to_start" in worker.log() and f"port {port}" in worker.log()
    assert " ready." not in worker.log()
    client = redis.Redis.from_url(pool_settings.redis_url)
    assert client.exists(pool_settings.keys.worker("portless@test")) == 0


def test_a_second_worker_with_a_live_name_is_refused_and_a_clean_stop_leaves_at_once(
    pool_settings: Settings,
) -> None:
    """Two processes cannot share a worker name; ``status`` shows the one that runs. A worker
    stopped cleanly deletes its heartbeat at once instead of looking live for 10 s."""
    client = redis.Redis.from_url(pool_settings.redis_url)
    key = pool_settings.keys.worker("twin@test")
    first = WorkerProcess(pool_settings, [0], "twin").wait_ready()
    try:
        assert wait_until(lambda: client.exists(key))
        second = WorkerProcess(pool_settings, [0], "twin")
        assert second.process.wait(timeout=60) == 2
        assert "worker_refused_to_start" in second.log() and "already live" in second.log()
        assert first.alive
        assert json.loads(client.get(key))["pid"] == first.process.pid  # type: ignore[arg-type]
    finally:
        first.stop()
    assert first.process.returncode == 0
    assert client.exists(key) == 0  # gone at the stop, not 10 s later


def test_shard_count_disagreement_is_named_by_status_and_by_the_client(
    pool_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Workers started with SCRIPTPOOL_SHARDS=2 and a status and a client that use 3: ``status``
    says so plainly and exits 3; the client logs one ``shard_count_mismatch`` error."""
    workers = [WorkerProcess(pool_settings, [n], f"count{n}").wait_ready() for n in range(SHARDS)]
    try:
        client_redis = redis.Redis.from_url(pool_settings.redis_url)
        assert wait_until(lambda: len(client_redis.keys(pool_settings.keys.workers_pattern())) == SHARDS)
        monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", pool_settings.redis_url)
        monkeypatch.setenv("SCRIPTPOOL_SHARDS", "3")
        capsys.readouterr()
        assert main(["status"]) == 3
        out = capsys.readouterr().out
        assert "2 live worker(s) run with SCRIPTPOOL_SHARDS=2, this status with 3" in out
        assert main(["status", "--json"]) == 3
        mismatch = json.loads(capsys.readouterr().out)["shard_count_mismatch"]
        assert sorted(mismatch["2"]) == ["count0@test", "count1@test"]

        with captured_events() as events:
            client = Client(pool_settings.replace(shards=3))
            try:
                assert wait_until(lambda: any(e["event"] == "shard_count_mismatch" for e in events))
                client._check_shard_count()  # checked again (as after a timeout): logged only once
            finally:
                client.close()
        found = [e for e in events if e["event"] == "shard_count_mismatch"]
        assert len(found) == 1 and found[0]["client_shards"] == 3
        assert found[0]["log_level"] == "error"
    finally:
        for worker in workers:
            worker.stop()


def test_flower_lists_a_worker_started_with_events(pool_settings: Settings) -> None:
    """Flower itself (its workers page, fed by Celery events) shows a worker started with
    ``--events`` as online, and lists the task it ran."""
    port = free_port()
    worker = WorkerProcess(pool_settings, [0], "flowered", events=True).wait_ready()
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "--broker", pool_settings.redis_url, "flower",
         f"--port={port}", "--address=127.0.0.1"],
        env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "1"},
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:

        def workers_page() -> dict[str, object]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/workers?json=1", timeout=2) as page:
                    data: dict[str, object] = json.load(page)
                    return data
            except OSError:
                return {}

        def listed() -> bool:
            rows = workers_page().get("data") or []
            return any(row.get("hostname") == "flowered@test" and row.get("status") for row in rows)  # type: ignore[union-attr]

        assert wait_until(listed, timeout=30), workers_page()
    finally:
        flower.terminate()
        flower.wait(timeout=10)
        worker.stop()


def test_close_wakes_the_reply_reader_and_removes_the_reply_list(pool_settings: Settings) -> None:
    """``close()`` does not wait out the reader's blocking read (1 s): it wakes it, and deletes
    the client's reply list."""
    client = Client(pool_settings)
    redis_client = redis.Redis.from_url(pool_settings.redis_url)
    key = pool_settings.keys.replies(client.client_id)
    redis_client.rpush(key, b"not a reply")  # the list exists, as after any call
    time.sleep(0.1)  # the reader is now inside its blocking read
    started = time.perf_counter()
    client.close()
    assert time.perf_counter() - started < 0.5  # the read alone would hold it up to 0.9 s more
    assert redis_client.exists(key) == 0
