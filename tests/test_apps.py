"""Several apps' scripts at one (EP, shop): joined by a reducer or chained, isolated from each
other, in one job on the shop's shard; in process and through real workers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from scriptpool.config import Settings
from scriptpool.config.errors import ConfigurationError, InvalidArgument, TooManyApps
from scriptpool.config.wire import Execution
from scriptpool.producer import Client
from scriptpool.registry import Registry
from scriptpool.runtime import Executor
from tests import guests
from tests.conftest import EXAMPLES, deployer_fixture
from tests.pool import pool_fixtures, shop_on

SHARDS = 2
CHAIN = [(EXAMPLES / "chain" / f"step_{step}.wasm").read_bytes() for step in "abc"]
REDUCER = (EXAMPLES / "reducer" / "best_per_target.wasm").read_bytes()


def discounts(app: str, *values: int, strategy: str = "FIRST") -> bytes:
    """A script printing a fixed discount output for ``app``."""
    body = {"discountApplicationStrategy": strategy, "discounts": [{"app": app, "value": v} for v in values]}
    return guests.writes(json.dumps(body).encode())


def statuses(execution: Execution) -> list[tuple[str, str, str | None]]:
    return [(p.app, p.status, p.error.code if p.error else None) for p in execution.parts]


# -- in process ---------------------------------------------------------------------------------


def test_join_concat_gives_every_apps_discounts_in_app_order(registry: Registry, executor: Executor) -> None:
    """Three apps' discount scripts joined with ``concat:discounts``: all three, in app order
    (app names sorted), the rest of the output from the first; one part per app."""
    registry.define_extension_point("multi", combine="join", reducer="concat:discounts")
    for app, value in (("loyalty", 5), ("bundle", 10), ("volume", 20)):
        registry.deploy("multi", "s", discounts(app, value, strategy=app), app=app)
    result = executor.execute("multi", "s", {})
    assert result.ok, result.error
    assert [d["app"] for d in result.output["discounts"]] == ["bundle", "loyalty", "volume"]
    assert result.output["discountApplicationStrategy"] == "bundle"
    assert statuses(result) == [("bundle", "ok", None), ("loyalty", "ok", None), ("volume", "ok", None)]
    assert all(p.version == 1 and p.report.instructions > 0 for p in result.parts)
    assert result.report.instructions == sum(p.report.instructions for p in result.parts)


def test_a_failing_app_drops_only_its_part_unless_it_blocks(registry: Registry, executor: Executor) -> None:
    """A trapping app's part is ``runtime_error`` and the others still combine; deployed with
    ``block_on_failure`` it fails the whole call with that error."""
    registry.define_extension_point("multi", combine="join", reducer="concat:discounts")
    registry.deploy("multi", "s", discounts("a", 1), app="a")
    registry.deploy("multi", "s", guests.TRAP, app="b")
    registry.deploy("multi", "s", discounts("c", 3), app="c")
    result = executor.execute("multi", "s", {})
    assert result.ok and [d["app"] for d in result.output["discounts"]] == ["a", "c"]
    assert statuses(result) == [("a", "ok", None), ("b", "error", "runtime_error"), ("c", "ok", None)]

    registry.deploy("multi", "s", guests.TRAP, app="b", block_on_failure=True)
    executor.invalidate("multi", "s")
    blocked = executor.execute("multi", "s", {})
    assert not blocked.ok and blocked.error is not None and blocked.error.code == "runtime_error"
    assert "app b failed and blocks the call" in blocked.error.message
    assert statuses(blocked) == [("a", "ok", None), ("b", "error", "runtime_error"), ("c", "skipped", None)]


def test_chain_passes_each_output_on_in_app_order(registry: Registry, executor: Executor) -> None:
    """Each chained script gets ``{"input", "previous"}``: steps a, b, c add 1, 10 and 100."""
    registry.define_extension_point("chain", combine="chain")
    for step, wasm in zip("abc", CHAIN, strict=True):
        registry.deploy("chain", "s", wasm, app=f"step-{step}")
    result = executor.execute("chain", "s", {"base": 1000})
    assert result.ok, result.error
    assert result.output == {"steps": ["a", "b", "c"], "total": 1111}
    registry.deploy("chain", "s", guests.TRAP, app="step-b")  # a failing step is skipped over
    executor.invalidate("chain", "s")
    skipped = executor.execute("chain", "s", {"base": 1000})
    assert skipped.output == {"steps": ["a", "c"], "total": 1101}
    assert statuses(skipped)[1] == ("step-b", "error", "runtime_error")


def test_a_chain_step_and_a_wasm_reducer_read_their_input_as_a_script_reads_the_call_s(
    registry: Registry, executor: Executor
) -> None:
    """The previous output a chain step gets, and the outputs a reducer gets, are minified and
    escaped as the call's own input is (``/`` as ``\\/``): the echo step and reducer print back
    exactly the bytes they read."""
    registry.define_extension_point("chain", combine="chain")
    registry.deploy("chain", "s", guests.writes(b'{"url": "a/b"}'), app="a")
    registry.deploy("chain", "s", guests.ECHO, app="b")
    chained = executor.execute("chain", "s", {"n": 1})
    assert chained.ok, chained.error
    assert chained.output == {"input": {"n": 1}, "previous": {"url": "a/b"}}
    assert chained.parts[1].report.output_bytes == len(b'{"input":{"n":1},"previous":{"url":"a\\/b"}}')
    registry.define_extension_point("echoed", combine="join", reducer="wasm")
    registry.deploy("echoed", "s", guests.writes(b'{"url": "a/b"}'), app="a")
    registry.deploy("echoed", "s", guests.ECHO, app="reducer")
    reduced = executor.execute("echoed", "s", {})
    assert reduced.ok, reduced.error
    assert reduced.output == {"outputs": [{"app": "a", "output": {"url": "a/b"}}]}
    assert reduced.parts[1].report.output_bytes == len(b'{"outputs":[{"app":"a","output":{"url":"a\\/b"}}]}')


def test_wasm_reducer_combines_what_no_builtin_can(registry: Registry, executor: Executor) -> None:
    """The app named ``reducer`` gets every part's output and prints the call's: here the best
    discount per target. It is listed last among the parts."""
    registry.define_extension_point("best", combine="join", reducer="wasm")
    for app, values in (("a", {"line-1": 5, "line-2": 30}), ("b", {"line-1": 15, "line-3": 1})):
        body = {"discounts": [{"target": t, "value": v} for t, v in values.items()]}
        registry.deploy("best", "s", guests.writes(json.dumps(body).encode()), app=app)
    registry.deploy("best", "s", REDUCER, app="reducer")
    result = executor.execute("best", "s", {})
    assert result.ok, result.error
    assert result.output == {
        "discounts": [
            {"target": "line-1", "value": 15},
            {"target": "line-2", "value": 30},
            {"target": "line-3", "value": 1},
        ],
        "apps": ["b", "a", "b"],
    }
    assert [p.app for p in result.parts] == ["a", "b", "reducer"]
    registry.define_extension_point("plain", combine="join", reducer="first")
    with pytest.raises(InvalidArgument):
        registry.deploy("plain", "s", REDUCER, app="reducer")  # only a wasm reducer has that app


def test_builtin_reducers_first_max_and_min(registry: Registry, executor: Executor) -> None:
    """``first`` takes the first app's output; ``max:PATH``/``min:PATH`` the one whose number at
    PATH is largest/smallest; an output the reducer cannot use drops that part."""
    outputs = {"a": {"total": {"amount": 3}}, "b": {"total": {"amount": 9}}, "c": {"total": {"amount": 1}}}
    for reducer, expected in (("first", "a"), ("max:total.amount", "b"), ("min:total.amount", "c")):
        ep = reducer.split(":")[0]
        registry.define_extension_point(ep, combine="join", reducer=reducer)
        for app, body in outputs.items():
            registry.deploy(ep, "s", guests.writes(json.dumps({**body, "by": app}).encode()), app=app)
        result = executor.execute(ep, "s", {})
        assert result.ok and result.output["by"] == expected, (reducer, result)
    registry.deploy("max", "s", guests.writes(b'{"total":{"amount":"lots"}}'), app="d")
    executor.invalidate("max", "s")
    result = executor.execute("max", "s", {})
    assert result.output["by"] == "b" and statuses(result)[3] == ("d", "error", "invalid_output")


def test_at_most_25_apps_and_a_single_ep_takes_one(registry: Registry, executor: Executor) -> None:
    """25 apps' scripts run in one call; the 26th is refused, as is a second app on a single EP."""
    registry.define_extension_point("many", combine="join", reducer="concat:discounts")
    for n in range(25):
        registry.deploy("many", "s", discounts(f"app-{n:02}", n), app=f"app-{n:02}")
    with pytest.raises(TooManyApps):
        registry.deploy("many", "s", discounts("one-more", 99), app="one-more")
    result = executor.execute("many", "s", {})
    assert [d["value"] for d in result.output["discounts"]] == list(range(25))
    registry.deploy("discount", "s", discounts("x", 1))
    with pytest.raises(TooManyApps):
        registry.deploy("discount", "s", discounts("y", 2), app="other")


def test_each_app_has_its_own_history_rollback_and_undeploy(registry: Registry, executor: Executor) -> None:
    """Versions count per app; rolling one app back or undeploying it leaves the others."""
    registry.define_extension_point("multi", combine="join", reducer="concat:discounts")
    registry.deploy("multi", "s", discounts("a", 1), app="a")
    registry.deploy("multi", "s", discounts("a", 2), app="a")
    registry.deploy("multi", "s", discounts("b", 7), app="b")
    assert [d.version for d in registry.history("multi", "s", app="a")] == [1]
    assert registry.history("multi", "s", app="b") == []
    assert registry.rollback("multi", "s", app="a").version == 1
    executor.invalidate("multi", "s")
    assert [d["value"] for d in executor.execute("multi", "s", {}).output["discounts"]] == [1, 7]
    assert registry.undeploy("multi", "s", app="b") and not registry.undeploy("multi", "s", app="b")
    executor.invalidate("multi", "s")
    assert [p.app for p in executor.execute("multi", "s", {}).parts] == ["a"]


def test_a_binding_from_before_apps_is_read_as_app_default(
    registry: Registry, executor: Executor, settings: Settings
) -> None:
    """A binding stored as one JSON value (as every binding was before apps) runs as app
    ``default``, and the next deploy turns it into the hash while keeping its version count."""
    import redis

    deployed = registry.deploy("test", "legacy", guests.writes(b'{"old":true}'))
    raw = redis.Redis.from_url(settings.redis_url)
    key = settings.keys.binding("test", "legacy")
    value = raw.hget(key, "default")
    raw.delete(key)
    raw.set(key, value)  # type: ignore[arg-type]
    assert executor.execute("test", "legacy", {}).output == {"old": True}
    assert registry.bindings("test", "legacy").only().version == deployed.version
    assert registry.deploy("test", "legacy", guests.writes(b'{"new":true}')).version == deployed.version + 1
    executor.invalidate("test", "legacy")
    assert executor.execute("test", "legacy", {}).output == {"new": True}


def test_a_slow_part_costs_its_own_part_when_the_deadline_nears(
    registry: Registry, executor: Executor
) -> None:
    """With the call's deadline 300 ms away and a script that would run 1 s, that script is cut
    at the deadline (``wall_clock_exceeded``); the part after it is skipped (``timeout``); the
    part before it counts, and the call answers at its deadline, not a second later. (The bound
    is what the cut guarantees, a wall limit cut to the epoch ticks left, plus what a busy
    machine may add to any step; the script alone would take 1 s.)"""
    registry.define_extension_point(
        "slowjoin", combine="join", reducer="concat:discounts", limits={"fuel": 10**15, "wall_ms": 1000}
    )
    registry.deploy("slowjoin", "s", discounts("a", 1), app="a")
    registry.deploy("slowjoin", "s", guests.INFINITE_LOOP, app="b")
    registry.deploy("slowjoin", "s", discounts("c", 3), app="c")
    deadline = time.time() + 0.3
    result = executor.execute("slowjoin", "s", {}, deadline=deadline)
    finished = time.time()
    assert finished < deadline + 0.25
    assert result.ok and [d["app"] for d in result.output["discounts"]] == ["a"]
    assert statuses(result) == [
        ("a", "ok", None),
        ("b", "error", "wall_clock_exceeded"),
        ("c", "skipped", "timeout"),
    ]


def test_hostile_parts_leave_the_others_correct(registry: Registry, executor: Executor) -> None:
    """In one join: an endless loop and an oversized output get their named errors; the good
    parts combine as usual, and the same executor runs a good call right after."""
    registry.define_extension_point("hostile", combine="join", reducer="concat:discounts")
    registry.deploy("hostile", "s", discounts("a", 1), app="a")
    registry.deploy("hostile", "s", guests.INFINITE_LOOP, app="loop")
    registry.deploy("hostile", "s", guests.OUTPUT_FLOOD, app="flood")
    registry.deploy("hostile", "s", discounts("z", 26), app="z")
    result = executor.execute("hostile", "s", {})
    assert result.ok and [d["app"] for d in result.output["discounts"]] == ["a", "z"]
    assert statuses(result) == [
        ("a", "ok", None),
        ("flood", "error", "output_too_large"),
        ("loop", "error", "instruction_limit_exceeded"),
        ("z", "ok", None),
    ]
    registry.deploy("test", "after", guests.ECHO)
    assert executor.execute("test", "after", {"still": "fine"}).output == {"still": "fine"}


def test_combine_settings_are_checked_when_an_ep_is_defined(registry: Registry) -> None:
    """A join needs a reducer of a known form; only a join has one."""
    for options in (
        {"combine": "join"},
        {"combine": "join", "reducer": "sum:x"},
        {"combine": "join", "reducer": "concat:"},
        {"combine": "chain", "reducer": "first"},
        {"combine": "merge"},
    ):
        with pytest.raises(ConfigurationError):
            registry.define_extension_point("bad", **options)  # type: ignore[arg-type]


# -- through real workers -----------------------------------------------------------------------

pool_settings, workers = pool_fixtures(SHARDS, {"apps0a": [0], "apps0b": [0], "apps1": [1]})


deployer = deployer_fixture((), scope="module")


@pytest.fixture(scope="module")
def client(pool_settings: Settings, workers: object) -> Iterator[Client]:
    with Client(pool_settings) as c:
        yield c


def test_pool_join_gives_one_outcome_with_every_part(deployer: Registry, client: Client) -> None:
    """Through a worker: one job runs every app's script; the outcome lists each part; a
    blocking failure gives the call's fallback."""
    deployer.define_extension_point("pooljoin", combine="join", reducer="concat:discounts")
    shop = shop_on(1, SHARDS)
    deployer.deploy("pooljoin", shop, discounts("a", 1), app="a")
    deployer.deploy("pooljoin", shop, guests.TRAP, app="b")
    deployer.deploy("pooljoin", shop, discounts("c", 3), app="c")
    outcome = client.run("pooljoin", shop, {}, timeout=5)
    assert outcome.ok and [d["app"] for d in outcome.output["discounts"]] == ["a", "c"]
    assert [(p.app, p.status) for p in outcome.parts] == [("a", "ok"), ("b", "error"), ("c", "ok")]
    assert outcome.parts[1].error is not None and outcome.parts[1].error.code == "runtime_error"
    deployer.deploy("pooljoin", shop, guests.TRAP, app="b", block_on_failure=True)
    time.sleep(0.1)
    blocked = client.run("pooljoin", shop, {}, timeout=5, fallback={"discounts": []})
    assert (blocked.status, blocked.error_code, blocked.output) == (
        "error",
        "runtime_error",
        {"discounts": []},
    )
    assert blocked.parts[2].status == "skipped"


def test_replacing_one_apps_script_never_mixes_versions_in_a_call(
    deployer: Registry, client: Client, workers: dict[str, Any]
) -> None:
    """While app b is redeployed back and forth, every call's output from b matches the version
    its part reports (one read of every app's binding per call), on both workers of the shard;
    and each redeploy reaches both workers."""
    deployer.define_extension_point("mix", combine="join", reducer="concat:discounts")
    shop = shop_on(0, SHARDS, skip=3)
    deployer.deploy("mix", shop, discounts("a", 0), app="a")
    deployer.deploy("mix", shop, discounts("b", 1), app="b")  # version 1 prints value 1
    stop = threading.Event()
    mismatches: list[Any] = []
    calls = 0

    def call() -> None:
        nonlocal calls
        while not stop.is_set():
            outcome = client.run("mix", shop, {}, timeout=5)
            if not outcome.ok:
                mismatches.append(outcome.error)
                continue
            part_b = next(p for p in outcome.parts if p.app == "b")
            value_b = next(d["value"] for d in outcome.output["discounts"] if d["app"] == "b")
            calls += 1
            if value_b != part_b.version:
                mismatches.append((part_b.version, value_b))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for version in range(2, 12):
        deployer.deploy("mix", shop, discounts("b", version), app="b")  # version N prints N
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    assert mismatches == [] and calls > 50
    time.sleep(0.1)  # invalidation reached both workers of shard 0: both serve version 11
    seen: dict[str, int] = {}
    for _ in range(400):
        outcome = client.run("mix", shop, {}, timeout=5)
        assert outcome.worker is not None
        seen[outcome.worker.split("@")[0]] = outcome.parts[1].version
        if len(seen) == 2:
            break
    assert seen == {"apps0a": 11, "apps0b": 11}
