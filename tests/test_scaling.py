"""Scaling out, against real servers: shard groups on two Redis, durable deploys refused when no
replica acknowledges, a worker whose shards span groups refused, status over every group, the
shard tools' refusals; and everything through a Sentinel set with passwords on both sides."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from scriptpool.cli import main
from scriptpool.config import Settings
from scriptpool.config.errors import NotReplicated
from scriptpool.producer import BreakerPolicy, Client
from scriptpool.registry import Registries
from scriptpool.testing import EmbeddedRedis, EmbeddedSentinelSet, worker_argv
from tests import guests
from tests.conftest import ROOT, TEST_ARTIFACT_KEY
from tests.pool import WorkerProcess, shop_on, worker_env
from tests.test_cli import FAILED, OK, UNREACHABLE, USAGE, one_line, run_cli

SHARDS = 2


@pytest.fixture(scope="module")
def group_redis() -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis]]:
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        yield a, b


@pytest.fixture
def groups(
    group_redis: tuple[EmbeddedRedis, EmbeddedRedis], monkeypatch: pytest.MonkeyPatch
) -> tuple[Settings, redis.Redis, redis.Redis]:
    """Settings with shard 0 on Redis A and shard 1 on Redis B (both flushed), in the CLI's
    environment too."""
    a, b = group_redis
    clients = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)
    for client in clients:
        client.flushall()
    settings = Settings(artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS, shard_groups=f"0={a.url};1={b.url}")
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    return settings, *clients


def test_definitions_go_to_every_group_and_a_deploy_to_its_shops_group(
    groups: tuple[Settings, redis.Redis, redis.Redis], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, a, b = groups
    keys = settings.keys
    module = tmp_path / "echo.wasm"
    module.write_bytes(guests.ECHO)
    shop_a, shop_b = shop_on(0, SHARDS), shop_on(1, SHARDS)
    assert main(["ep", "define", "test"]) == OK
    assert main(["deploy", "test", shop_a, str(module)]) == OK
    assert main(["deploy", "test", shop_b, str(module)]) == OK
    assert a.exists(keys.extension_point("test")) and b.exists(keys.extension_point("test"))
    assert a.exists(keys.binding("test", shop_a)) and not b.exists(keys.binding("test", shop_a))
    assert b.exists(keys.binding("test", shop_b)) and not a.exists(keys.binding("test", shop_b))
    capsys.readouterr()
    assert main(["history", "test", shop_b, "--json"]) == OK
    assert json.loads(capsys.readouterr().out)["versions"][0]["version"] == 1


def test_a_shard_move_takes_every_app_its_history_and_a_rollout_under_way(
    groups: tuple[Settings, redis.Redis, redis.Redis], capsys: pytest.CaptureFixture[str]
) -> None:
    """A join's apps with their histories, and a rollout with its candidate's module and its
    counts, move with the shard: the target then holds the same binding hash, lists and state,
    and lists the rollout as under way."""
    from scriptpool.cli._shard_copy import copy_shard
    from scriptpool.registry import RolloutRules

    settings, a, b = groups
    keys = settings.keys
    shop = shop_on(0, SHARDS, skip=5)
    registries = Registries(settings)
    with registries.on_shop(shop, what="test", again="") as registry:
        registry.define_extension_point("joined", combine="join", reducer="first")
        registry.deploy("joined", shop, guests.writes(b'{"v":1}'), app="a")
        registry.deploy("joined", shop, guests.writes(b'{"v":2}'), app="a")
        registry.deploy("joined", shop, guests.writes(b'{"w":1}'), app="b")
        candidate = registry.start_rollout("joined", shop, guests.writes(b'{"w":2}'), RolloutRules(), app="b")
    report = copy_shard(settings, 0, settings.group_of(0).url, settings.group_of(1).url)
    assert report.bindings == 1 and report.histories == 2  # app a's history and the rollout's state
    assert a.hgetall(keys.binding("joined", shop)) == b.hgetall(keys.binding("joined", shop))
    assert b.lrange(keys.history("joined", shop, "a"), 0, -1) == a.lrange(
        keys.history("joined", shop, "a"), 0, -1
    )
    assert b.hgetall(keys.rollout("joined", shop)) == a.hgetall(keys.rollout("joined", shop))
    assert b.exists(keys.module(candidate.deployment["sha256"]))
    assert b.sismember(keys.rollouts_under_way(), f"joined/{shop}")


def test_status_names_a_group_missing_a_definition_and_a_define_heals_it(
    groups: tuple[Settings, redis.Redis, redis.Redis],
    group_redis: tuple[EmbeddedRedis, EmbeddedRedis],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A define while one group's Redis is down reaches the others and says which group missed
    it (exit 4); status then lists the gap (exit 3); running the define again heals it."""
    _, _, b = groups
    _, server_b = group_redis
    server_b.stop(kill=True)
    try:
        line = one_line(capsys, ["ep", "define", "late"], UNREACHABLE)
    finally:
        server_b.start()
    assert "broker_unavailable: cannot reach Redis of group 1" in line
    assert "done in group(s) 0" in line and "group(s) 1 miss it" in line
    b.flushall()  # the restarted Redis has no persistence: B lacks it
    capsys.readouterr()
    assert main(["status", "--json"]) == 3  # no worker either, but the gap is what we look at
    gaps = json.loads(capsys.readouterr().out)["registry_gaps"]
    assert gaps == [{"group": "1", "kind": "extension point", "name": "late", "problem": "missing"}]
    main(["status"])
    out = capsys.readouterr().out
    assert "warning: group 1 lacks extension point late" in out and "scriptpool ep define late" in out
    assert main(["ep", "define", "late"]) == OK
    capsys.readouterr()
    main(["status", "--json"])
    assert json.loads(capsys.readouterr().out)["registry_gaps"] == []


def test_a_deploy_no_replica_acknowledges_is_refused_with_not_replicated(
    groups: tuple[Settings, redis.Redis, redis.Redis],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """With SCRIPTPOOL_DEPLOY_REPLICAS=1 and no replica, a deploy waits SCRIPTPOOL_DEPLOY_WAIT_MS,
    then exits 1 with one line saying it is live but not durable and what to do; the binding is
    in place on the primary, exactly as the message says."""
    settings, a, _ = groups
    module = tmp_path / "echo.wasm"
    module.write_bytes(guests.ECHO)
    shop = shop_on(0, SHARDS, skip=3)
    assert main(["ep", "define", "test"]) == OK
    monkeypatch.setenv("SCRIPTPOOL_DEPLOY_REPLICAS", "1")
    monkeypatch.setenv("SCRIPTPOOL_DEPLOY_WAIT_MS", "200")
    started = time.monotonic()
    line = one_line(capsys, ["deploy", "test", shop, str(module)], FAILED)
    assert 0.2 <= time.monotonic() - started < 2
    assert line.startswith("scriptpool: not_replicated: the deploy of")
    assert "is live on the primary of group 0" in line and "only 0 of 1 replica(s) acknowledged" in line
    assert "deploy the same module again" in line
    assert a.exists(settings.keys.binding("test", shop))
    assert "not_replicated" in one_line(capsys, ["ep", "define", "again"], FAILED)
    main(["deploy", "test", shop, str(module), "--json"])
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["code"], error["exit_code"]) == ("not_replicated", FAILED)
    # The library says the same with the class, and its detail.
    durable = Registries(Settings.from_env())
    with pytest.raises(NotReplicated) as caught, durable.on_shop(shop, what="x", again="y") as registry:
        registry.deploy("test", shop, guests.ECHO)
    assert caught.value.detail == {"acknowledged": 0, "required": 1, "timeout_ms": 200, "group": "0"}


def test_a_worker_whose_shards_span_groups_is_refused(
    groups: tuple[Settings, redis.Redis, redis.Redis],
) -> None:
    """`scriptpool worker` and plain `celery worker` alike refuse, with one line and exit 2."""
    settings, _, _ = groups
    env = worker_env(settings)
    result = run_cli(["worker", "--shards", "0,1"], env)
    assert result.returncode == USAGE and len(result.stderr.strip().splitlines()) == 1
    assert "shards must all be in one group of SCRIPTPOOL_SHARD_GROUPS" in result.stderr
    argv = worker_argv(settings, [0, 1], name="spanning@test")
    plain = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = plain.stderr.strip().splitlines()
    assert plain.returncode == USAGE, plain.stderr[-2000:]
    assert lines[-1].startswith(
        "scriptpool worker: configuration_error: a worker's shards must all be in one group"
    )


def test_shard_tools_refuse_what_would_go_wrong(
    groups: tuple[Settings, redis.Redis, redis.Redis],
    group_redis: tuple[EmbeddedRedis, EmbeddedRedis],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, a, _ = groups
    url_a, url_b = group_redis[0].url, group_redis[1].url
    assert "is already served by" in one_line(capsys, ["shard", "move", "0", "--to", url_a], USAGE)
    assert "--to must use one of" in one_line(capsys, ["shard", "move", "0", "--to", "http://x"], USAGE)
    assert "shard must be in 0..1" in one_line(capsys, ["shard", "move", "5", "--to", url_b], USAGE)
    assert "drain runs with the new map" in one_line(capsys, ["shard", "drain", "0", "--from", url_a], USAGE)
    # A message left in the old queue with nobody to take it: the drain gives up, named.
    a.lpush(settings.keys.queue(1), b"{}")
    line = one_line(
        capsys, ["shard", "drain", "1", "--from", url_a, "--quiet-s", "0.5", "--timeout-s", "1"], FAILED
    )
    assert (
        line.startswith("scriptpool: shard_not_drained: shard 1's old queue")
        and "1 message(s) queued" in line
    )


# -- through a Sentinel set ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinels() -> Iterator[EmbeddedSentinelSet]:
    """Passwords on the data nodes and on the sentinels, so both reach every component."""
    with EmbeddedSentinelSet(password="data-pw", sentinel_password="sentinel-pw") as found:
        yield found


def test_everything_runs_through_one_sentinel_url(
    sentinels: EmbeddedSentinelSet,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """The CLI, a worker (kombu's Sentinel transport, its registry, heartbeat and invalidations)
    and the client (publisher, reply reader, asyncio path) all through the sentinel:// URL; a
    deploy is acknowledged by the replica; with the replica frozen, the next deploy is refused."""
    settings = Settings(redis_url=sentinels.url, artifact_key=TEST_ARTIFACT_KEY, shards=1, deploy_wait_ms=300)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    v1, v2 = tmp_path / "v1.wasm", tmp_path / "v2.wasm"
    v1.write_bytes(guests.writes(b'{"v": 1}'))
    v2.write_bytes(guests.writes(b'{"v": 2}'))
    assert main(["ep", "define", "test"]) == OK
    assert main(["deploy", "test", "7", str(v1)]) == OK  # WAIT 1: the replica has it
    replica = sentinels.replica_ports()[0]
    with sentinels.data_client(replica) as client:
        assert client.exists(settings.keys.binding("test", "7"))
    worker = WorkerProcess(settings, [0], "sentinel").wait_ready()
    try:
        with Client(settings) as client:
            assert client.run("test", "7", {}, timeout=5).output == {"v": 1}
            assert main(["deploy", "test", "7", str(v2)]) == OK
            deadline = time.monotonic() + 3  # the invalidation reaches the worker through Sentinel
            while client.run("test", "7", {}, timeout=5).output != {"v": 2}:
                assert time.monotonic() < deadline, "the worker kept the old binding"
                time.sleep(0.05)

            async def both() -> list[object]:
                outcomes = await asyncio.gather(
                    *(client.run_async("test", "7", {}, timeout=5) for _ in range(20))
                )
                return [o.output for o in outcomes]

            assert asyncio.run(both()) == [{"v": 2}] * 20
        time.sleep(2.5)  # a heartbeat
        capsys.readouterr()
        assert main(["status", "--json"]) == OK
        status = json.loads(capsys.readouterr().out)
        assert status["redis"].startswith("sentinel://127.0.0.1:") and "pw" not in json.dumps(status)
        assert status["shard_table"][0]["workers"] == ["sentinel@test"]
    finally:
        worker.stop()
    sentinels.freeze(replica)
    try:
        line = one_line(capsys, ["deploy", "test", "7", str(v1)], FAILED)
    finally:
        sentinels.thaw(replica)
    assert "not_replicated" in line and "only 0 of 1 replica(s) acknowledged it within 300 ms" in line
    assert sentinels.data_client(sentinels.primary_port()).exists(settings.keys.binding("test", "7")) == 1


def test_a_wrong_sentinel_password_is_one_line(sentinels: EmbeddedSentinelSet) -> None:
    url = sentinels.url.replace("sentinel_password=sentinel-pw", "sentinel_password=wrong")
    result = run_cli(["ep", "list"], {"SCRIPTPOOL_REDIS_URL": url, **_no_groups()})
    assert result.returncode == UNREACHABLE and len(result.stderr.strip().splitlines()) == 1
    assert "broker_unavailable" in result.stderr and "wrong" not in result.stderr


def _no_groups() -> dict[str, str]:
    return {"SCRIPTPOOL_SHARD_GROUPS": "", "PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]}


def test_callers_of_a_frozen_redis_are_answered_by_their_deadline() -> None:
    """A Redis that stops answering with its connections open (SIGSTOP: frozen, or cut off):
    every caller gets its fallback by its deadline + 50 ms, not after the 1 s socket timeout, the
    first one included; calls go out directly again once it answers."""
    import signal

    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=TEST_ARTIFACT_KEY, shards=1)
        Registries(settings).everywhere(lambda r: r.define_extension_point("test"), what="t", again="t")
        with Client(settings, breaker=BreakerPolicy(error_threshold=10**9)) as client:  # every call tries
            assert client.run("test", "1", {}, timeout=0.2).error_code == "timeout"  # no worker
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                late = []
                for _ in range(30):
                    started = time.monotonic()
                    outcome = client.run("test", "1", {}, timeout=0.1)
                    late.append((time.monotonic() - started - 0.1) * 1000)
                    # broker_unavailable once its publish failed, timeout if still in flight
                    assert outcome.error_code in ("broker_unavailable", "timeout"), outcome
            finally:
                server.process.send_signal(signal.SIGCONT)
            assert max(late) <= 50, late
            deadline = time.monotonic() + 5
            while client.run("test", "1", {}, timeout=0.2).error_code != "timeout":
                assert time.monotonic() < deadline  # enqueued again (and timed out: no worker)
            assert not client._groups[0].failing


def test_a_tls_only_sentinel_set_end_to_end_and_after_a_failover(tmp_path: Path) -> None:
    """Sentinels and data nodes that speak only TLS: ``?ssl=true`` gives TLS to both kinds of link
    (kombu needs broker_use_ssl for the data link and sentinel_kwargs for the sentinels: either
    alone fails); a deploy, a worker and a client work, and keep working after a failover."""
    import shutil

    from tests.faults.test_security import _make_certificates

    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make a throwaway CA")
    _make_certificates(tmp_path, "ours", roles=("server",))
    tls = (tmp_path / "ours-ca.crt", tmp_path / "ours-server.crt", tmp_path / "ours-server.key")
    with EmbeddedSentinelSet(tls=tls) as sentinels:
        assert "ssl=true" in sentinels.url
        settings = Settings(redis_url=sentinels.url, artifact_key=TEST_ARTIFACT_KEY, shards=1)
        registries = Registries(settings)
        registries.everywhere(lambda r: r.define_extension_point("test"), what="t", again="t")
        with registries.on_shop("1", what="deploy", again="again") as registry:  # WAIT 1 over TLS
            registry.deploy("test", "1", guests.ECHO)
        worker = WorkerProcess(settings, [0], "tls-sentinel").wait_ready()
        try:
            with Client(settings) as client:
                assert client.run("test", "1", {"a": 1}, timeout=5).output == {"a": 1}
                old = sentinels.primary_port()
                sentinels.kill(old)
                sentinels.wait_for_new_primary(old)
                deadline = time.monotonic() + 10
                while not client.run("test", "1", {"a": 2}, timeout=0.5).ok:
                    assert time.monotonic() < deadline, worker.log()[-3000:]
                    time.sleep(0.1)
        finally:
            worker.stop()
