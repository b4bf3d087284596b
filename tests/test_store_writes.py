"""Scripts writing data (``storeWrites``) through real workers: the buyer journey of
examples/store, every write limit with a hostile script, failed runs and shadow candidates
writing nothing, a worker SIGKILLed in a burst of writing runs (each run's writes all there or
none), replay showing writes and applying none, and a write racing a read.

Most scripts here are one echo module (output == input), so each test says in its input what
the script returns, ``storeWrites`` included."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from scriptpool.config import Settings
from scriptpool.config.errors import StoreLimitExceeded
from scriptpool.config.store import (
    MAX_KEY_CHARS,
    MAX_KEYS_PER_SCOPE,
    MAX_VALUE_BYTES,
    MAX_VALUE_DEPTH,
    MAX_WRITES_PER_RUN,
    SESSION,
    SHOP,
    decode_value,
    scope_hash,
)
from scriptpool.engine import Sandbox
from scriptpool.producer import Client, Outcome
from scriptpool.registry import Registry, RolloutRules
from scriptpool.runtime import CaptureStore, recorded_output, replay
from tests import guests
from tests.conftest import EXAMPLES, TEST_ARTIFACT_KEY, deployer_fixture
from tests.pool import WorkerProcess, shops_on, start_workers

STORE = EXAMPLES / "store"
APP = "default"
WAIT_S = 5.0  # writes land after the reply; what this bounds is a test that cannot pass


def big_echo() -> bytes:
    """Echoes stdin to stdout, up to 256 KiB (tests.guests.ECHO stops at 60 KiB): room for a
    value over MAX_VALUE_BYTES."""
    return guests.wasm(f"""
(module
  (import "{guests.WASI}" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "{guests.WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 5)
  (func (export "_start") (local $total i32) (local $n i32)
    (block $done (loop $more
      (i32.store (i32.const 0) (i32.add (i32.const 1024) (local.get $total)))
      (i32.store (i32.const 4) (i32.sub (i32.const 262144) (local.get $total)))
      (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $n (i32.load (i32.const 8)))
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $total (i32.add (local.get $total) (local.get $n)))
      (br $more)))
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (local.get $total))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
""")


ECHO = big_echo()
# The output schema allows only "ok": storeWrites is taken out before it is checked.
OK_ONLY = {"type": "object", "required": ["ok"], "properties": {"ok": {}}, "additionalProperties": False}
ROOMY = {"input_bytes": 512 * 1024, "output_bytes": 512 * 1024}
RACE_SCHEMA = "type Input { n: Int }"
RACE_QUERY = 'query { race: store(scope: SHOP, key: "race") }'


def _read(name: str) -> str:
    return (STORE / name).read_text()


DEFINITIONS: dict[str, dict[str, Any]] = {
    "echo": {"output_schema": OK_ONLY, "limits": ROOMY, "capture_rate": 1.0},
    "racer": {"input_graphql": RACE_SCHEMA},
    "product-view": {
        "input_graphql": _read("product_view/schema.graphql"),
        "output_schema": json.loads(_read("product_view/output_schema.json")),
    },
    "checkout-upsell": {
        "input_graphql": _read("checkout_upsell/schema.graphql"),
        "output_schema": json.loads(_read("checkout_upsell/output_schema.json")),
    },
}


@pytest.fixture(scope="module")
def pool_settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, artifact_key=TEST_ARTIFACT_KEY, shards=1)


@pytest.fixture(scope="module")
def workers(pool_settings: Settings) -> Iterator[list[WorkerProcess]]:
    started = start_workers(pool_settings, {"sw": [0]})
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


deployer = deployer_fixture(DEFINITIONS, after=("workers",))


@pytest.fixture
def client(pool_settings: Settings, workers: list[WorkerProcess], deployer: Registry) -> Iterator[Client]:
    with Client(pool_settings) as c:
        yield c


@pytest.fixture
def db(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def stored(
    db: redis.Redis, settings: Settings, shop: str, key: str, *, scope: str = SHOP, session: str | None = None
) -> Any:
    """The value of ``key`` in the app's data (None if absent)."""
    raw = db.hget(scope_hash(settings.keys, scope, APP, shop, session), key)
    return None if raw is None else decode_value(raw)


def until(check: Any, timeout: float = WAIT_S) -> Any:
    """``check()`` once it is truthy (or its last value at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def write(key: str, value: Any, scope: str = SHOP) -> dict[str, Any]:
    return {"scope": scope, "key": key, "value": value}


def echo_run(client: Client, shop: str, writes: Any, **extra: Any) -> Outcome:
    """The echo EP's run returning ``{"ok": 1}`` and ``writes`` (no session)."""
    return client.run("echo", shop, {"ok": 1, "storeWrites": writes, **extra}, timeout=10)


SHOPS = shops_on(0, 1, 12, prefix="sw")


def test_buyer_journey_view_then_checkout_sees_the_product_in_its_own_session_only(
    client: Client, deployer: Registry, db: redis.Redis, pool_settings: Settings
) -> None:
    """product-view records the product in the SESSION (the host sees only {"recorded": true});
    checkout-upsell with the same session offers it; another session, or the same token at
    another shop, sees nothing."""
    shop, other_shop = SHOPS[0], SHOPS[1]
    for each in (shop, other_shop):
        for ep, name in (("product-view", "product_view"), ("checkout-upsell", "checkout_upsell")):
            deployer.deploy(
                ep,
                each,
                (STORE / name / f"{name}.wasm").read_bytes(),
                input_query=_read(f"{name}/run.graphql"),
            )
    viewed = json.loads(_read("product_view/input.json"))
    cart = json.loads(_read("checkout_upsell/input.json"))
    outcome = client.run("product-view", shop, viewed, timeout=10, session="buyer-1")
    assert outcome.ok, outcome.error
    assert outcome.output == {"recorded": True} and outcome.report is not None
    assert outcome.report.store_writes == 1
    product = {"id": viewed["product"]["id"], "title": viewed["product"]["title"]}
    assert (
        until(lambda: stored(db, pool_settings, shop, "viewed", scope=SESSION, session="buyer-1")) == product
    )

    def upsell(each: str, session: str | None) -> Any:
        result = client.run("checkout-upsell", each, cart, timeout=10, session=session)
        assert result.ok, result.error
        return result.output["upsell"]

    offered = until(lambda: upsell(shop, "buyer-1"))
    assert offered == {
        "productId": product["id"],
        "title": product["title"],
        "message": f"Still thinking about {product['title']}?",
    }
    assert upsell(shop, "buyer-2") is None
    assert upsell(shop, None) is None
    assert upsell(other_shop, "buyer-1") is None


@pytest.mark.parametrize(
    ("writes", "limit"),
    [
        ([write("big", "x" * (MAX_VALUE_BYTES + 1))], "value_bytes"),
        (
            [write("deep", json.loads("[" * (MAX_VALUE_DEPTH + 1) + "]" * (MAX_VALUE_DEPTH + 1)))],
            "value_depth",
        ),
        ([write("k" * (MAX_KEY_CHARS + 1), 1)], "key_chars"),
        ([write(f"w{i}", i) for i in range(MAX_WRITES_PER_RUN + 1)], "writes_per_run"),
        ([write("viewed", 1, SESSION)], "session"),  # the call has no session
        ([write("everyone", 1, "APP")], "scope"),
        ("not a list", "not_a_list"),
        ([{"scope": SHOP, "key": "k", "value": 1, "extra": 2}], "not_a_write"),
    ],
    ids=[
        "value_bytes",
        "depth",
        "key_chars",
        "too_many",
        "session_without_one",
        "app_scope",
        "not_list",
        "extra",
    ],
)
def test_a_write_over_a_limit_fails_the_run_by_name_and_writes_nothing(
    client: Client,
    deployer: Registry,
    db: redis.Redis,
    pool_settings: Settings,
    writes: Any,
    limit: str,
) -> None:
    """Each hostile write fails the run with store_limit_exceeded saying which write and why;
    the valid write listed before it is not applied either."""
    shop = SHOPS[2]
    deployer.deploy("echo", shop, ECHO)
    listed = [write("fine", "first"), *writes] if isinstance(writes, list) else writes
    outcome = echo_run(client, shop, listed)
    assert not outcome.ok and outcome.error_code == StoreLimitExceeded.code, outcome
    assert outcome.error is not None and outcome.error.detail["limit"] == limit, outcome.error
    if isinstance(writes, list) and limit != "writes_per_run":
        assert outcome.error.detail["index"] == 1
    good = echo_run(client, shop, [write("after", 1)])  # the worker serves on
    assert good.ok and good.output == {"ok": 1}, good
    assert until(lambda: stored(db, pool_settings, shop, "after")) == 1
    assert stored(db, pool_settings, shop, "fine") is None


def test_a_flood_of_keys_past_the_scope_cap_is_refused_at_apply_and_logged(
    client: Client, deployer: Registry, db: redis.Redis, pool_settings: Settings, workers: list[WorkerProcess]
) -> None:
    """Runs of 64 new keys each fill the SHOP scope: the run that would pass MAX_KEYS_PER_SCOPE
    is refused whole where the writes happen (its caller already had its reply), logged as
    store_write_refused; a good script is served right after."""
    shop = SHOPS[3]
    deployer.deploy("echo", shop, ECHO)
    runs = MAX_KEYS_PER_SCOPE // MAX_WRITES_PER_RUN + 1
    for r in range(runs):
        outcome = echo_run(client, shop, [write(f"r{r}-{i}", i) for i in range(MAX_WRITES_PER_RUN)])
        assert outcome.ok, outcome.error  # the cap is met after the reply
    full = (runs - 1) * MAX_WRITES_PER_RUN
    hash_name = scope_hash(pool_settings.keys, SHOP, APP, shop)
    assert until(lambda: "store_write_refused" in workers[0].log()), "no refusal logged"
    assert db.hlen(hash_name) == full
    assert not db.hexists(hash_name, f"r{runs - 1}-0")
    event = next(json.loads(line) for line in workers[0].log().splitlines() if "store_write_refused" in line)
    assert event["limit"] == "keys_per_scope" and event["shop"] == shop
    good = echo_run(client, shop, [write(f"r0-{i}", "again") for i in range(3)])  # existing keys
    assert good.ok
    assert until(lambda: stored(db, pool_settings, shop, "r0-0") == "again")


def test_a_failed_runs_writes_are_not_applied(
    client: Client, deployer: Registry, db: redis.Redis, pool_settings: Settings
) -> None:
    """A run whose output fails the EP's schema fails: its valid writes are never applied."""
    shop = SHOPS[4]
    deployer.deploy("echo", shop, ECHO)
    outcome = echo_run(client, shop, [write("failed", 1)], unexpected=True)
    assert outcome.error_code == "invalid_output", outcome
    ok = echo_run(client, shop, [write("marker", 1)])
    assert ok.ok and until(lambda: stored(db, pool_settings, shop, "marker")) == 1
    assert stored(db, pool_settings, shop, "failed") is None


def test_a_shadow_candidates_writes_are_never_applied(
    client: Client, deployer: Registry, db: redis.Redis, pool_settings: Settings
) -> None:
    """The live script writes nothing; its candidate returns the same output with a write. The
    shadow runs compare them as equal (writes are not output) and apply none of its writes."""
    shop = SHOPS[5]
    deployer.deploy("echo", shop, guests.writes(b'{"ok":1}'))
    deployer.start_rollout(
        "echo",
        shop,
        guests.writes(b'{"ok":1,"storeWrites":[{"scope":"SHOP","key":"shadow","value":1}]}'),
        RolloutRules(promote_after=10_000),
    )

    def matched() -> bool:
        assert client.run("echo", shop, {}, timeout=10).ok
        return deployer.rollouts.status("echo", shop).counts.get("match", 0) >= 5

    assert until(matched, 60.0), deployer.rollouts.status("echo", shop)
    assert stored(db, pool_settings, shop, "shadow") is None


def test_replay_shows_the_writes_and_applies_none(
    client: Client, deployer: Registry, db: redis.Redis, pool_settings: Settings, sandbox: Sandbox
) -> None:
    """The captured run holds the script's output with its storeWrites; replaying it gives the
    same output, lists the writes, and writes nothing."""
    shop = SHOPS[6]
    deployer.deploy("echo", shop, ECHO)
    outcome = echo_run(client, shop, [write("replayed", {"n": 1})])
    assert outcome.ok and until(lambda: stored(db, pool_settings, shop, "replayed")) == {"n": 1}
    db.hdel(scope_hash(pool_settings.keys, SHOP, APP, shop), "replayed")
    captures = CaptureStore(db, pool_settings)
    summary = until(lambda: captures.summaries(shop_id=shop, ep="echo"))
    assert summary, "the run was not captured"
    run = captures.get(summary[0].id)
    assert recorded_output(run)["storeWrites"] == [write("replayed", {"n": 1})]
    replayed = replay(run, deployer, sandbox)
    assert replayed.identical and replayed.result.output == {"ok": 1}
    assert [w.shown() for w in replayed.result.writes] == [
        {"scope": SHOP, "key": "replayed", "value": '{"n":1}'}
    ]
    time.sleep(0.2)
    assert stored(db, pool_settings, shop, "replayed") is None


def test_a_write_racing_a_read_is_seen_whole_old_or_new(
    client: Client, deployer: Registry, pool_settings: Settings
) -> None:
    """One thread's runs rewrite a large value, another's read it through the input query: each
    read is a whole value some write wrote (its two copies of the counter agree), never a part."""
    shop = SHOPS[7]
    deployer.deploy("echo", shop, ECHO)
    deployer.deploy("racer", shop, guests.ECHO, input_query=RACE_QUERY)
    pad = "p" * 20_000
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            value = {"head": n, "pad": pad, "tail": n}
            assert echo_run(client, shop, [write("race", value)]).ok

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    seen = []
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            outcome = client.run("racer", shop, {"n": 1}, timeout=10)
            assert outcome.ok, outcome.error
            value = outcome.output["race"]
            if value is not None:
                assert value["head"] == value["tail"] and value["pad"] == pad
                seen.append(value["head"])
    finally:
        stop.set()
        thread.join(10)
    assert len(set(seen)) > 1, "the reader never saw the value change"


@pytest.fixture
def kill_settings(pool_settings: Settings) -> Settings:
    return pool_settings.replace(key_prefix="swkill")


def test_a_worker_sigkilled_in_a_burst_of_writes_leaves_each_run_whole_or_absent(
    kill_settings: Settings, db: redis.Redis, sandbox: Sandbox
) -> None:
    """Runs of 16 distinct keys each, from many callers at once; the worker is SIGKILLed in the
    middle. Afterwards each run's keys are all there or none, never a part."""
    from scriptpool.testing import make_registry

    started = start_workers(kill_settings, {"swk": [0]})
    worker = started[0]
    try:
        registry = make_registry(kill_settings, DEFINITIONS, sandbox=sandbox)
        shop = SHOPS[8]
        registry.deploy("echo", shop, ECHO)
        per_run, runs = 16, 400
        with Client(kill_settings) as client:
            assert echo_run(client, shop, []).ok

            def one(r: int) -> None:
                client.run(
                    "echo",
                    shop,
                    {"ok": 1, "storeWrites": [write(f"run{r}-{i}", "x" * 200) for i in range(per_run)]},
                    timeout=3,
                )

            with ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(one, r) for r in range(runs)]
                time.sleep(0.5)
                os.killpg(worker.process.pid, signal.SIGKILL)
                for future in futures:
                    future.result()
        fields = {k.decode() for k in db.hkeys(scope_hash(kill_settings.keys, SHOP, APP, shop))}
        counts = [sum(f"run{r}-{i}" in fields for i in range(per_run)) for r in range(runs)]
        assert all(c in (0, per_run) for c in counts), [c for c in counts if c not in (0, per_run)]
        assert 0 < counts.count(per_run) < runs, "the kill did not land mid-burst"
    finally:
        worker.kill()
