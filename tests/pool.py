"""Real Celery worker subprocesses for tests: start per shard, wait until ready, stop or kill;
and the one fixture factory that gives a test module its pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scriptpool.config import Settings, shard_for
from scriptpool.testing import worker_argv
from tests.conftest import ROOT, TEST_ARTIFACT_KEY


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment of a worker process that runs with ``settings`` (and the test key)."""
    return {
        **os.environ,
        **settings.replace(artifact_key=TEST_ARTIFACT_KEY).to_env(),
        "PYTHONPATH": str(ROOT),
    }


class WorkerProcess:
    """One ``celery worker`` process consuming some shards, logging to its own file."""

    def __init__(
        self,
        settings: Settings,
        shards: list[int],
        name: str,
        extra_env: dict[str, str] | None = None,
        *,
        events: bool = False,
    ) -> None:
        self.name = name
        self.shards = shards
        self.logfile = Path(tempfile.mkdtemp(prefix="scriptpool-worker-")) / f"{name}.log"
        argv = worker_argv(settings, shards, name=f"{name}@test", loglevel="INFO", events=events)
        argv += ["--logfile", str(self.logfile)]
        self.process = subprocess.Popen(
            argv,
            env={**worker_env(settings), **(extra_env or {})},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30.0) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return self
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited: {self.log()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"worker {self.name} not ready: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def executed_jobs(self) -> list[str]:
        """Job ids of the executions this worker logged, in order (one JSON event per run)."""
        jobs = []
        for line in self.log().splitlines():
            if '"event": "execution"' in line:
                jobs.append(json.loads(line[line.index("{") :])["job"])
        return jobs

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


def shops_on(shard: int, shards: int, count: int = 1, *, skip: int = 0, prefix: str = "") -> list[str]:
    """``count`` shop ids (``<prefix>.<n>`` with a prefix) that map to ``shard`` of ``shards``,
    after skipping the first ``skip``: tests take distinct shops by skipping."""
    names = (f"{prefix}.{n}" if prefix else str(n) for n in range(1_000_000))
    found = (shop for shop in names if shard_for(shop, shards) == shard)
    for _ in range(skip):
        next(found)
    return [next(found) for _ in range(count)]


def shop_on(shard: int, shards: int, *, skip: int = 0, prefix: str = "") -> str:
    """One shop id that maps to ``shard`` of ``shards`` (see :func:`shops_on`)."""
    return shops_on(shard, shards, 1, skip=skip, prefix=prefix)[0]


def pid_of(worker_field: str | None) -> int:
    """The process id in an outcome's ``worker`` field (``name@host:pid``)."""
    assert worker_field is not None
    return int(worker_field.rsplit(":", 1)[1])


def start_workers(settings: Settings, layout: dict[str, list[int]]) -> list[WorkerProcess]:
    """Start workers named by ``layout`` (name -> shards) in parallel and wait for all."""
    workers = [WorkerProcess(settings, shards, name) for name, shards in layout.items()]
    try:
        for worker in workers:
            worker.wait_ready()
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return workers


def pool_fixtures(
    shards: int,
    layout: dict[str, list[int]],
    *,
    redis: str = "redis_url",
    settings: str = "pool_settings",
    key_prefix: str = "sp",
) -> tuple[Callable[..., Settings], Callable[..., Iterator[dict[str, WorkerProcess]]]]:
    """A test module's pool, as two module-scoped fixtures: settings with ``shards`` shards on the
    Redis fixture named ``redis`` (a URL or an :class:`EmbeddedRedis`), as the fixture named
    ``settings``; and ``workers``, the workers of ``layout`` (name -> shards) started in parallel,
    as a dict by name, stopped after the module. In a module:
    ``pool_settings, workers = pool_fixtures(2, {"w0": [0], "w1": [1]})``. A ``key_prefix`` of
    its own keeps the module's queues and heartbeats apart from an earlier module's workers (one
    still stopping, or its heartbeat not yet expired, would count as a peer on the shard)."""

    @pytest.fixture(scope="module", name=settings)
    def settings_fixture(request: pytest.FixtureRequest) -> Settings:
        server: Any = request.getfixturevalue(redis)
        url = server if isinstance(server, str) else server.url
        return Settings(redis_url=url, artifact_key=TEST_ARTIFACT_KEY, shards=shards, key_prefix=key_prefix)

    @pytest.fixture(scope="module")
    def workers(request: pytest.FixtureRequest) -> Iterator[dict[str, WorkerProcess]]:
        started = start_workers(request.getfixturevalue(settings), layout)
        yield {worker.name: worker for worker in started}
        for worker in started:
            worker.stop()

    return settings_fixture, workers
