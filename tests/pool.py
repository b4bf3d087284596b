"""Real Celery worker subprocesses for tests: start per shard, wait until ready, stop or kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from config import Settings, shard_for
from scriptpool._cli import worker_argv
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
        self, settings: Settings, shards: list[int], name: str, extra_env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.shards = shards
        self.logfile = Path(tempfile.mkdtemp(prefix="scriptpool-worker-")) / f"{name}.log"
        argv = worker_argv(settings, shards, name=f"{name}@test", loglevel="INFO")
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


def shops_on(shard: int, shards: int, count: int = 1) -> list[str]:
    """``count`` shop ids that map to ``shard`` of ``shards``."""
    found = (str(n) for n in range(1_000_000) if shard_for(str(n), shards) == shard)
    return [next(found) for _ in range(count)]


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
