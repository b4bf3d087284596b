"""A pool on this machine for the commands that need one (``demo``, ``bench``): a private Redis
unless one is configured, one worker per shard, and cleanup of everything started."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from config import Settings
from config.errors import ConfigurationError
from scriptpool._embedded_redis import EmbeddedRedis


@contextmanager
def local_pool(
    label: str,
    *,
    external: bool = False,
    shards: int | None = None,
    extra_commands: tuple[list[str], ...] = (),
    say: Callable[[str], None] = lambda _: None,
) -> Iterator[tuple[Settings, dict[str, str]]]:
    """Yield (settings, environment) for a running pool; stop whatever this started on exit.

    With ``external`` nothing is started: the Redis in ``SCRIPTPOOL_REDIS_URL`` and its running
    workers are used. ``extra_commands`` start alongside the workers (e.g. a reference worker).
    """
    env = dict(os.environ)
    server: EmbeddedRedis | None = None
    processes: list[subprocess.Popen[bytes]] = []
    try:
        if "SCRIPTPOOL_REDIS_URL" in env or external:
            say("using the Redis in SCRIPTPOOL_REDIS_URL")
        else:
            say("starting a private Redis on a free loopback port")
            server = EmbeddedRedis().start()
            env["SCRIPTPOOL_REDIS_URL"] = server.url
        env.setdefault("SCRIPTPOOL_ARTIFACT_KEY", secrets.token_hex(16))
        if shards is not None:
            env.setdefault("SCRIPTPOOL_SHARDS", str(shards))
        settings = Settings.from_env(env)
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        client.ping()
        if external:
            say("using the workers already running")
        else:
            say(f"starting {settings.shards} shard workers")
            commands = [
                [
                    sys.executable,
                    "-m",
                    "scriptpool",
                    "worker",
                    "--shards",
                    str(n),
                    "--name",
                    f"{label}-shard{n}@%h",
                ]
                for n in range(settings.shards)
            ]
            for argv in [*commands, *extra_commands]:
                processes.append(
                    subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
        deadline = time.monotonic() + 60
        while len(client.keys(settings.keys.workers_pattern())) < settings.shards:
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise ConfigurationError(f"{label}: shard workers did not start within 60 s")
            time.sleep(0.1)
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
