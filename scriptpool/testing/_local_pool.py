"""A pool on this machine, for tests and for the commands that need one (``demo``, ``bench``): a
private Redis and one worker per shard, or, with ``external``, the Redis and workers the user runs;
everything started is stopped again."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from scriptpool.config import Settings
from scriptpool.config.environment import VARIABLES
from scriptpool.config.errors import ConfigurationError
from scriptpool.config.heartbeats import live_workers
from scriptpool.config.redis import redis_client
from scriptpool.testing._embedded_redis import EmbeddedRedis

WORKERS_START_S = 60


@contextmanager
def local_pool(
    label: str,
    *,
    external: bool = False,
    shards: int | None = None,
    extra_commands: tuple[list[str], ...] = (),
    say: Callable[[str], None] = lambda _: None,
) -> Iterator[tuple[Settings, dict[str, str]]]:
    """Yield (settings, environment) of a running pool; stop whatever this started on exit.

    Without ``external`` the pool is private: a Redis of its own on a free loopback port and one
    worker per shard, started with none of the user's ``SCRIPTPOOL_*`` settings (their Redis,
    key prefix or metrics port must not leak in). With ``external`` nothing is started: the Redis
    in ``SCRIPTPOOL_REDIS_URL`` and its running workers are used, and the caller keeps its writes
    apart from the user's (under names of its own). ``extra_commands`` start alongside the workers.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith("SCRIPTPOOL_")}
    server: EmbeddedRedis | None = None
    processes: list[subprocess.Popen[bytes]] = []
    try:
        if external:
            env.update({v.name: os.environ[v.name] for v in VARIABLES if v.name in os.environ})
            say("using the Redis in SCRIPTPOOL_REDIS_URL and its running workers")
            settings = Settings.from_env(env)
            settings.require_artifact_key()  # deploys must be signed with the workers' key
            if len(settings.groups) > 1:
                raise ConfigurationError(
                    f"--external runs on one Redis, and SCRIPTPOOL_SHARD_GROUPS names {len(settings.groups)} "
                    "groups: run it with SCRIPTPOOL_SHARD_GROUPS unset and SCRIPTPOOL_REDIS_URL set to one",
                    variable="SCRIPTPOOL_SHARD_GROUPS",
                )
        else:
            say("starting a private Redis on a free loopback port")
            server = EmbeddedRedis().start()
            env["SCRIPTPOOL_REDIS_URL"] = server.url
            env["SCRIPTPOOL_ARTIFACT_KEY"] = secrets.token_hex(16)
            env["SCRIPTPOOL_SHARDS"] = str(shards or Settings().shards)
            settings = Settings.from_env(env)
            say(f"starting {settings.shards} shard workers")
            for n in range(settings.shards):
                argv = [
                    sys.executable,
                    "-m",
                    "scriptpool",
                    "worker",
                    "--shards",
                    str(n),
                    "--name",
                    f"{label}-shard{n}@%h",
                ]
                processes.append(
                    subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
        for argv in extra_commands:
            processes.append(
                subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        _wait_for_workers(settings, processes)
        yield settings, env
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        if server is not None:
            server.cleanup()


def _wait_for_workers(settings: Settings, processes: list[subprocess.Popen[bytes]]) -> None:
    client = redis_client(settings.redis_url, timeout=5, connect_timeout=2)
    try:
        client.ping()
        deadline = time.monotonic() + WORKERS_START_S
        while True:
            served = {s for beat in live_workers(client, settings.keys) for s in beat.shards}
            missing = sorted(set(range(settings.shards)) - served)
            if not missing:
                return
            if any(p.poll() is not None for p in processes):
                raise ConfigurationError(
                    "a shard worker exited while starting (run `scriptpool worker` to see why)"
                )
            if time.monotonic() > deadline:
                raise ConfigurationError(
                    f"no live worker serves shard(s) {missing} after {WORKERS_START_S} s"
                )
            time.sleep(0.1)
    finally:
        client.close()
