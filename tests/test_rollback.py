"""Rollback keeps every version (issue 21, item 10): the newer versions a rollback leaves stay in
the history, ``rollback --to VERSION`` binds any kept version, earlier or later, with the same
atomic swap, durable write and invalidation as a deploy, and ``history`` shows which one is live."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from scriptpool.cli import main
from scriptpool.config import Settings
from scriptpool.config.errors import InvalidArgument, NothingToRollBack
from scriptpool.engine import Sandbox
from scriptpool.producer import Client
from scriptpool.registry import Registry, RolloutRules
from scriptpool.runtime import Executor
from tests import guests
from tests.conftest import TEST_ARTIFACT_KEY
from tests.pool import WorkerProcess, shop_on, start_workers
from tests.test_cli import FAILED, OK, USAGE, cli_env, one_line

__all__ = ["cli_env"]  # a fixture this module uses, imported from the CLI tests


def version(n: int) -> bytes:
    """A script whose output names its version: ``{"v": n}``."""
    return guests.writes(json.dumps({"v": n}).encode())


def serves(executor: Executor, shop: str = "s") -> Any:
    """What a worker that heard the invalidation serves at (test, ``shop``)."""
    executor.invalidate("test", shop)
    return executor.execute("test", shop, {}).output


def listen(client: redis.Redis, channel: str) -> Any:
    """A subscription to ``channel`` that Redis has confirmed: nothing published later is missed."""
    listener = client.pubsub()
    listener.subscribe(channel)
    confirmed = listener.get_message(timeout=5)
    assert confirmed is not None and confirmed["type"] == "subscribe"
    return listener


def test_a_rollback_keeps_the_newer_version_and_rolls_forward_to_it(
    registry: Registry, executor: Executor
) -> None:
    """Deploy v1, v2, v3; roll back to v2: v3 is still kept, and ``to=3`` binds it again (the
    same module, the same version number); ``to=1`` goes back two at once."""
    for n in (1, 2, 3):
        registry.deploy("test", "s", version(n))
    back = registry.rollback("test", "s")
    assert (back.version, serves(executor)) == (2, {"v": 2})
    assert sorted(d.version for d in registry.history("test", "s")) == [1, 3]
    forward = registry.rollback("test", "s", to=3)
    assert (forward.version, serves(executor)) == (3, {"v": 3})
    assert sorted(d.version for d in registry.history("test", "s")) == [1, 2]
    assert registry.rollback("test", "s", to=1).version == 1 and serves(executor) == {"v": 1}
    assert sorted(d.version for d in registry.history("test", "s")) == [2, 3]


def test_a_deploy_after_a_rollback_takes_a_new_version_number(registry: Registry, executor: Executor) -> None:
    """After rolling v3 back to v2, the next deploy is v4, not a second v2 or v3: a version
    number names one module for good."""
    modules = {n: registry.deploy("test", "s", version(n)).sha256 for n in (1, 2, 3)}
    registry.rollback("test", "s")
    deployed = registry.deploy("test", "s", version(4))
    assert deployed.version == 4 and serves(executor) == {"v": 4}
    kept = {d.version: d.sha256 for d in registry.history("test", "s")}
    assert kept == modules  # 1, 2 and 3, each still its own module


def test_a_plain_rollback_skips_the_versions_rolled_back_from(registry: Registry, executor: Executor) -> None:
    """v1, v2 (bad), rollback to v1, v3 (bad too): a plain rollback goes to v1, never to v2,
    which an operator rolled away from; a second one has nothing left and names what is kept;
    ``to=2`` still binds it if asked."""
    registry.deploy("test", "s", version(1))
    registry.deploy("test", "s", version(2))
    assert registry.rollback("test", "s").version == 1
    (rolled_back,) = registry.history("test", "s")
    assert rolled_back.version == 2 and rolled_back.rolled_back_at is not None
    registry.deploy("test", "s", version(3))
    assert registry.rollback("test", "s").version == 1 and serves(executor) == {"v": 1}
    with pytest.raises(NothingToRollBack) as caught:
        registry.rollback("test", "s")
    assert caught.value.detail["kept"] == [2, 3] and "--to" in caught.value.message
    assert registry.rollback("test", "s", to=2).version == 2 and serves(executor) == {"v": 2}
    live = registry.binding("test", "s")
    assert live.rolled_back_at is None  # a live binding never carries the mark


def test_rollback_to_a_version_not_kept_or_live_already(
    registry: Registry, redis_client: redis.Redis
) -> None:
    """``to`` a version never deployed is ``nothing_to_roll_back`` naming the kept ones; ``to``
    the live version changes nothing (no invalidation), so repeating a rollback is safe; a
    version that is not a whole number from 1 is ``invalid_argument``."""
    registry.deploy("test", "s", version(1))
    registry.deploy("test", "s", version(2))
    with pytest.raises(NothingToRollBack) as caught:
        registry.rollback("test", "s", to=7)
    assert caught.value.detail["kept"] == [1] and "version 7" in caught.value.message
    before = redis_client.hgetall(registry._keys.binding("test", "s"))
    listener = listen(redis_client, registry._keys.invalidations())
    assert registry.rollback("test", "s", to=2).version == 2
    assert listener.get_message(timeout=0.2) is None
    assert redis_client.hgetall(registry._keys.binding("test", "s")) == before
    assert [d.version for d in registry.history("test", "s")] == [1]
    for bad in (0, -1, True, "2"):
        with pytest.raises(InvalidArgument):
            registry.rollback("test", "s", to=bad)  # type: ignore[arg-type]
    listener.close()


def test_a_rollback_forward_is_one_atomic_swap_with_its_invalidation(
    registry: Registry, redis_client: redis.Redis
) -> None:
    """Rolling forward publishes the invalidation every worker listens to, bumps the binding's
    generation, and supersedes a rollout of that app, as a rollback always did."""
    registry.deploy("test", "s", version(1))
    registry.deploy("test", "s", version(2))
    registry.rollback("test", "s")
    generation = registry.bindings("test", "s").generation
    registry.start_rollout("test", "s", version(5), RolloutRules())
    listener = listen(redis_client, registry._keys.invalidations())
    assert registry.rollback("test", "s", to=2).version == 2
    message = listener.get_message(timeout=2)
    assert message is not None and json.loads(message["data"]) == {"ep": "test", "shop_id": "s"}
    read = registry.bindings("test", "s")
    assert read.generation > generation and read.candidate is None
    status = registry.rollouts.status("test", "s")
    assert (status.state, status.reason) == ("aborted", "superseded by a rollback of the live version")
    listener.close()


def test_rollback_and_history_through_the_command_line(
    cli_env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``rollback`` says where it went and how to come back; ``history`` lists every kept
    version by number with the live one marked (and the one rolled back from); ``--to`` goes
    forward; ``--to`` the live version says so; a version never deployed names those kept."""
    assert main(["ep", "define", "test"]) == OK
    for n in (1, 2, 3):
        module = tmp_path / f"v{n}.wasm"
        module.write_bytes(version(n))
        assert main(["deploy", "test", "7", str(module)]) == OK
    capsys.readouterr()
    assert main(["rollback", "test", "7"]) == OK
    said = capsys.readouterr().out
    assert "rolled test/7 back to version 2" in said and "rollback test 7 --to 3" in said
    assert main(["history", "test", "7", "--json"]) == OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["live"] == {"default": 2}
    assert [(v["version"], v["active"], v["rolled_back"] is not None) for v in shown["versions"]] == [
        (3, False, True),
        (2, True, False),
        (1, False, False),
    ]
    assert main(["history", "test", "7"]) == OK
    table = capsys.readouterr().out.splitlines()
    assert "rolled back" in table[2] and table[3].rstrip().endswith("yes")
    assert main(["rollback", "test", "7", "--to", "3", "--json"]) == OK
    rolled = json.loads(capsys.readouterr().out)
    assert (rolled["version"], rolled["replaced_version"], rolled["active"]) == (3, 2, True)
    assert main(["rollback", "test", "7", "--to", "3"]) == OK
    assert "version 3 of test/7 is live already" in capsys.readouterr().out
    line = one_line(capsys, ["rollback", "test", "7", "--to", "9"], FAILED)
    assert "nothing_to_roll_back" in line and "version 9" in line and "1, 2" in line
    assert "invalid_argument" in one_line(capsys, ["rollback", "test", "7", "--to", "0"], USAGE)
    assert "unknown_extension_point" in one_line(capsys, ["rollback", "nope", "7"], FAILED)


def test_a_rollback_is_durable_as_a_deploy_and_says_how_to_repeat_it(
    cli_env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With a replica required and none there, ``rollback --to`` waits for it like a deploy
    (WAIT), is live on the primary, and says to run the same ``--to`` command again."""
    assert main(["ep", "define", "test"]) == OK
    for n in (1, 2):
        module = tmp_path / f"v{n}.wasm"
        module.write_bytes(version(n))
        assert main(["deploy", "test", "7", str(module)]) == OK
    monkeypatch.setenv("SCRIPTPOOL_DEPLOY_REPLICAS", "1")
    monkeypatch.setenv("SCRIPTPOOL_DEPLOY_WAIT_MS", "200")
    capsys.readouterr()
    line = one_line(capsys, ["rollback", "test", "7", "--to", "1"], FAILED)
    assert "not_replicated" in line and "run `scriptpool rollback test 7 --to 1` again" in line
    live = redis.Redis.from_url(cli_env).hget(Settings().keys.binding("test", "7"), "default")
    assert live is not None and json.loads(live)["version"] == 1


SHARDS = 1


@pytest.fixture(scope="module")
def pool_settings(redis_url: str) -> Settings:
    """One shard; workers keep a binding for 10 minutes unless told, so only the invalidation
    can make them serve another version within a test."""
    return Settings(
        redis_url=redis_url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS, binding_cache_ttl_s=600
    )


@pytest.fixture(scope="module")
def workers(pool_settings: Settings) -> Iterator[dict[str, WorkerProcess]]:
    """One worker on the shard, for the module."""
    (worker,) = start_workers(pool_settings, {"w0": [0]})
    yield {"w0": worker}
    worker.stop()


@pytest.fixture
def pool_registry(redis_client: redis.Redis, pool_settings: Settings, sandbox: Sandbox) -> Registry:
    """A registry on the pool's Redis with the ``test`` EP."""
    registry = Registry(redis_client, pool_settings, sandbox)
    registry.define_extension_point("test")
    return registry


def _until(client: Client, shop: str, expected: Any) -> Any:
    """The output the worker serves, once it is ``expected`` (the invalidation is asynchronous),
    or the last one seen after 10 s; its cache would keep the old one for 600 s."""
    output = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        output = client.run("test", shop, {}, timeout=5).output
        if output == expected:
            break
        time.sleep(0.02)
    return output


def test_a_worker_serves_the_version_rolled_forward_to(
    pool_registry: Registry, pool_settings: Settings, workers: dict[str, WorkerProcess]
) -> None:
    """A real worker that served v2, then v1 after a rollback, serves v2 again after
    ``rollback --to 2``: it heard the change on the invalidation channel, as after a deploy."""
    shop = shop_on(0, SHARDS)
    with Client(pool_settings) as client:
        pool_registry.deploy("test", shop, version(1))
        pool_registry.deploy("test", shop, version(2))
        assert _until(client, shop, {"v": 2}) == {"v": 2}
        pool_registry.rollback("test", shop)
        assert _until(client, shop, {"v": 1}) == {"v": 1}
        pool_registry.rollback("test", shop, to=2)
        assert _until(client, shop, {"v": 2}) == {"v": 2}
    assert workers["w0"].alive
