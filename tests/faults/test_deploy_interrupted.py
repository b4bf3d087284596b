"""Scenario 5: a deploy killed before each of its Redis commands, and Redis restarts with AOF."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import redis

from scriptpool.config import Settings
from scriptpool.engine import Sandbox
from scriptpool.producer import Client
from scriptpool.registry import Registry
from scriptpool.testing import EmbeddedRedis
from tests import guests
from tests.conftest import ROOT, TEST_ARTIFACT_KEY
from tests.faults._proxy import DROP, FORWARD, FORWARD_THEN_CUT, FaultProxy
from tests.faults.conftest import Recorder
from tests.pool import shops_on, start_workers, worker_env

SHARDS = 1
OLD, NEW = {"v": "old"}, {"v": "new"}


def deploy_through(
    proxy_port: int, settings: Settings, shop: str, module: Path, kill_at: int | None, *, sent: bool = False
) -> int:
    """Run ``scriptpool deploy`` in its own process, talking to Redis through a proxy, and
    SIGKILL it at its ``kill_at``-th Redis command: before the command leaves, or with ``sent``
    after Redis ran it but before the reply arrives. Returns how many commands it sent."""
    process: list[subprocess.Popen[bytes]] = []

    def before_command(number: int, name: str) -> str:
        if number != kill_at:
            return FORWARD
        while not process:
            time.sleep(0.001)
        # The command's bytes are already in the proxy, so "killed after Redis ran it" is: kill
        # the process now, then let the proxy deliver the command and swallow the reply.
        os.kill(process[0].pid, signal.SIGKILL)
        return FORWARD_THEN_CUT if sent else DROP

    proxy = FaultProxy(proxy_port, before_command=before_command)
    env = {**worker_env(settings), "SCRIPTPOOL_REDIS_URL": proxy.url}
    argv = [sys.executable, "-m", "scriptpool", "deploy", "test", shop, str(module)]
    try:
        process.append(
            subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
        output, _ = process[0].communicate(timeout=60)
        if kill_at is None:
            assert process[0].returncode == 0, output.decode(errors="replace")
        else:
            assert process[0].returncode == -signal.SIGKILL, output.decode(errors="replace")
        return proxy.commands
    finally:
        proxy.close()


def test_deploy_killed_before_every_redis_command_never_shows_a_partial_deploy(
    reliability: Recorder,
) -> None:
    """Killing the deploying process before each of its Redis commands in turn leaves the old
    version serving or the new one fully in place, never a mix; callers see only whole versions."""
    with EmbeddedRedis(appendonly=True) as server:
        settings = Settings(redis_url=server.url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS)
        client_redis = redis.Redis.from_url(server.url)
        registry = Registry(client_redis, settings, Sandbox())
        registry.define_extension_point("test")
        shop, counting_shop = shops_on(0, SHARDS, 2)
        old = registry.deploy("test", shop, guests.writes(json.dumps(OLD).encode()))
        module = Path(tempfile.mkdtemp(prefix="scriptpool-deploy-")) / "new.wasm"
        module.write_bytes(guests.writes(json.dumps(NEW).encode()))
        # A full deploy of the same module elsewhere tells how many commands a deploy sends.
        commands = deploy_through(server.port, settings, counting_shop, module, kill_at=None)
        assert commands >= 4

        workers = start_workers(settings, {"d0": [0]})
        outputs: Counter[str] = Counter()
        stop = threading.Event()
        try:
            with Client(settings) as client:
                assert client.run("test", shop, {}, timeout=5).output == OLD

                def read_continuously() -> None:  # callers during the attempts: whole versions only
                    while not stop.is_set():
                        outcome = client.run("test", shop, {}, timeout=2)
                        outputs[json.dumps(outcome.output) if outcome.ok else str(outcome.error_code)] += 1

                reader = threading.Thread(target=read_continuously)
                reader.start()
                seen: Counter[str] = Counter()
                attempts = [(n, sent) for n in range(1, commands + 1) for sent in (False, True)]
                for kill_at, sent in attempts:
                    deploy_through(server.port, settings, shop, module, kill_at=kill_at, sent=sent)
                    current = registry.binding("test", shop)
                    if current.sha256 == old.sha256:
                        assert current == old, f"binding changed but not to the new version: {current}"
                        seen["old"] += 1
                    else:  # the bind went through: the whole new version must be there
                        assert registry.verified_artifact(current.sha256) is not None
                        assert registry.history("test", shop)[0] == old
                        seen["new"] += 1
                        registry.rollback("test", shop)
                    time.sleep(0.05)  # let the worker's invalidation arrive before checking
                    assert client.run("test", shop, {}, timeout=5).output == OLD
                stop.set()
                reader.join()
                deploy_through(server.port, settings, shop, module, kill_at=None)
                time.sleep(0.05)
                assert client.run("test", shop, {}, timeout=5).output == NEW
            assert all(w.alive for w in workers)
        finally:
            stop.set()
            for worker in workers:
                worker.stop()
    assert set(outputs) <= {json.dumps(OLD), json.dumps(NEW)}, outputs
    # Only the bind (the last command) switches versions, and only once Redis has run it.
    assert (seen["old"], seen["new"]) == (2 * commands - 1, 1), seen

    reliability(
        5,
        "Deploy interrupted; Redis restarted with AOF",
        load="one caller thread running the shop's script back to back through a real worker",
        fault=f"`scriptpool deploy` process SIGKILLed at each of its {commands} Redis commands in "
        "turn, once before the command reaches Redis and once after Redis ran it but before the "
        "reply (a TCP proxy counts the commands)",
        asserted="after every kill the binding is the old deployment, field for field, or the new "
        "one with its artifact and history; callers only ever get a whole version; a clean "
        "deploy afterwards serves the new version",
        figures={
            "interrupted deploys": len(attempts),
            "leaving the old version bound / the new one whole / a mix": f"{seen['old']} / {seen['new']} / "
            f"{len(attempts) - seen['old'] - seen['new']}",
            "calls during the attempts (old / new / error)": f"{outputs[json.dumps(OLD)]:,} / "
            f"{outputs[json.dumps(NEW)]:,} / {sum(v for k, v in outputs.items() if not k.startswith('{'))}",
        },
    )


def test_deployments_survive_a_redis_kill_with_aof_on(reliability: Recorder) -> None:
    """With AOF on (`appendfsync everysec`, as in docker-compose.yml), SIGKILLing Redis keeps every
    binding, module, artifact and history entry, and the same worker serves the script once Redis
    is back. With AOF off the same restart loses the binding, which is why AOF is required."""
    survived: dict[str, bool] = {}
    for appendonly in (True, False):
        with EmbeddedRedis(appendonly=appendonly, appendfsync="everysec") as server:
            settings = Settings(redis_url=server.url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS)
            registry = Registry(redis.Redis.from_url(server.url), settings, Sandbox())
            registry.define_extension_point("test")
            shop = shops_on(0, SHARDS)[0]
            registry.deploy("test", shop, guests.writes(json.dumps(OLD).encode()))
            deployed = registry.deploy("test", shop, guests.writes(json.dumps(NEW).encode()))
            if not appendonly:
                server.restart()
                survived["off"] = (
                    redis.Redis.from_url(server.url).exists(settings.keys.binding("test", shop)) == 1
                )
                continue
            workers = start_workers(settings, {"a0": [0]})
            try:
                with Client(settings) as client:
                    assert client.run("test", shop, {}, timeout=5).output == NEW
                    killed_at = time.monotonic()
                    server.restart()
                    assert registry.binding("test", shop) == deployed
                    assert registry.verified_artifact(deployed.sha256) is not None
                    assert [d.sha256 for d in registry.history("test", shop)] != []
                    outcome = client.run("test", shop, {}, timeout=0.5)
                    while not outcome.ok and time.monotonic() < killed_at + 15:
                        outcome = client.run("test", shop, {}, timeout=0.5)
                    serving_after_s = time.monotonic() - killed_at
                    assert outcome.ok and outcome.output == NEW
                assert all(w.alive for w in workers)
                survived["on"] = True
            finally:
                for worker in workers:
                    worker.stop()
    assert survived == {"on": True, "off": False}

    reliability(
        5,
        "Deploy interrupted; Redis restarted with AOF",
        load="a deployed script, one caller",
        fault="redis-server SIGKILLed and restarted, with `appendonly yes`, `appendfsync everysec` "
        "(the compose setting), and again with AOF off",
        asserted="with AOF: binding, artifact and history intact, same worker serves it after the "
        "restart; without AOF the binding is gone",
        figures={
            "binding kept across SIGKILL, AOF on / off": "yes / no",
            "script served again after the kill (s)": round(serving_after_s, 2),
        },
    )
