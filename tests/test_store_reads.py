"""Scripts reading script data through their input query (``store(scope:, key:)``), through real
workers and a real Redis: the worker resolves the values from data it holds (the host neither
loads nor sends them), each app sees only its own data, of the call's shop and session; a host
write reaches every worker; a session's TTL is respected; replay stays exact after the data
changed. Also the schema's ``store`` field, its cost, and the session argument's checks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import redis

from scriptpool.config import Keys, Settings, get_logger
from scriptpool.config.errors import InvalidArgument, InvalidInputQuery
from scriptpool.config.input_query import InputQuery, InputSchema
from scriptpool.config.redis import InvalidationListener
from scriptpool.config.store import APP, SESSION, SHOP, apply_writes, encode_value, invalidation_message
from scriptpool.config.wire import Execution, ExecutionReport, Job
from scriptpool.engine import Sandbox
from scriptpool.producer import Client, DataStore
from scriptpool.registry import Registry
from scriptpool.runtime import CaptureStore, Sample, StoreCache, replay
from scriptpool.runtime._store import ENTRY_OVERHEAD
from tests import guests
from tests.conftest import deployer_fixture
from tests.pool import pool_fixtures, shop_on

log = get_logger("test")

SDL = "type Input { cart: Cart }\ntype Cart { total: Int }"

# A script's query: a field of the host's input and data of every scope (one absent key).
QUERY = """
query Input {
  cart { total }
  rates: store(scope: SHOP, key: "rates")
  config: store(scope: APP, key: "config")
  seen: store(scope: SESSION, key: "seen")
  absent: store(scope: SHOP, key: "never-written")
}
"""
SHOP_ONLY = 'query Input { v: store(scope: SHOP, key: "k") a: store(scope: APP, key: "k") }'
SESSION_ONLY = 'query Input { seen: store(scope: SESSION, key: "seen") }'

pool_settings, workers = pool_fixtures(2, {"sr0": [0], "sr1": [1]})
deployer = deployer_fixture((), scope="module")
SHOP0, SHOP1 = shop_on(0, 2, prefix="sr"), shop_on(1, 2, prefix="sr")


@pytest.fixture(scope="module")
def client(pool_settings: Settings, workers: object) -> Iterator[Client]:
    """One client for the module, as a host keeps one."""
    with Client(pool_settings) as c:
        yield c


@pytest.fixture(scope="module")
def data(pool_settings: Settings) -> Iterator[DataStore]:
    """The partner's data API on the pool's Redis."""
    with DataStore(pool_settings) as store:
        yield store


@pytest.fixture(scope="module")
def ep(deployer: Registry) -> str:
    """A single-script EP with an input schema, capturing every run."""
    deployer.define_extension_point("sr_single", input_graphql=SDL, capture_rate=1.0)
    return "sr_single"


def write_session(settings: Settings, app: str, shop: str, token: str, key: str, value: Any) -> None:
    """Write one SESSION value as a script's ``storeWrites`` are applied (and announced)."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        refusal = apply_writes(
            client, settings.keys, app, shop, token, [(SESSION, key, encode_value(value))], session_ttl_s=60
        )
        assert refusal is None
    finally:
        client.close()


def test_a_script_gets_the_data_its_query_selects_and_the_host_sends_none(
    deployer: Registry, client: Client, data: DataStore, ep: str, pool_settings: Settings
) -> None:
    """An echo script whose query selects data of each scope prints the values the worker holds
    (null for an absent key, and for SESSION data without a session); the client's selection
    leaves ``store`` out, and a value the host puts under ``store`` is never what the script
    sees."""
    deployer.deploy(ep, SHOP0, guests.ECHO, input_query=QUERY)
    data.set("default", "rates", {"standard": 4.9, "express": [12, "EUR"]}, shop=SHOP0)
    data.set("default", "config", {"free_over": 50})
    write_session(pool_settings, "default", SHOP0, "tok-1", "seen", ["p1", "p2"])
    spoof = {"cart": {"total": 7}, "store": "from the host", 'store({"key":"rates","scope":"SHOP"})': 1}
    outcome = client.run(ep, SHOP0, spoof, session="tok-1", strict=True, timeout=10)
    assert outcome.output == {
        "cart": {"total": 7},
        "rates": {"standard": 4.9, "express": [12, "EUR"]},
        "config": {"free_over": 50},
        "seen": ["p1", "p2"],
        "absent": None,
    }
    assert client.input_query(ep, SHOP0) == {"cart": {"total": None}}  # no store fields to load
    without = client.run(ep, SHOP0, {"cart": {"total": 7}}, strict=True, timeout=10)
    assert without.output is not None and without.output["seen"] is None
    assert without.output["rates"] == {"standard": 4.9, "express": [12, "EUR"]}


def test_each_app_shop_and_session_sees_only_its_own_data(
    deployer: Registry, client: Client, data: DataStore, pool_settings: Settings
) -> None:
    """A join of apps a and b (the reducer echoes both parts): each reads its own APP and SHOP
    data under the same key; another shop of the same apps sees its own SHOP data and none of
    the first shop's session, although the token is the same; another token sees nothing."""
    deployer.define_extension_point("sr_join", input_graphql=SDL, combine="join", reducer="wasm")
    query = SHOP_ONLY.replace("}", 'seen: store(scope: SESSION, key: "seen") }')
    other = shop_on(0, 2, prefix="sr", skip=1)
    for shop in (SHOP0, other):
        for app in ("a", "b"):
            deployer.deploy("sr_join", shop, guests.ECHO, app=app, input_query=query)
        deployer.deploy("sr_join", shop, guests.ECHO, app="reducer")
    for app in ("a", "b"):
        data.set(app, "k", f"app data of {app}")
        data.set(app, "k", f"{app} at {SHOP0}", shop=SHOP0)
        data.set(app, "k", f"{app} at {other}", shop=other)
        write_session(pool_settings, app, SHOP0, "shared-token", "seen", f"{app}'s session at {SHOP0}")

    def parts(shop: str, session: str | None) -> dict[str, Any]:
        outcome = client.run("sr_join", shop, {}, session=session, strict=True, timeout=10)
        assert outcome.output is not None
        return {part["app"]: part["output"] for part in outcome.output["outputs"]}

    assert parts(SHOP0, "shared-token") == {
        app: {"v": f"{app} at {SHOP0}", "a": f"app data of {app}", "seen": f"{app}'s session at {SHOP0}"}
        for app in ("a", "b")
    }
    assert parts(other, "shared-token") == {
        app: {"v": f"{app} at {other}", "a": f"app data of {app}", "seen": None} for app in ("a", "b")
    }
    assert parts(SHOP0, "another-token") == {
        app: {"v": f"{app} at {SHOP0}", "a": f"app data of {app}", "seen": None} for app in ("a", "b")
    }


def test_a_host_write_reaches_every_worker(
    deployer: Registry, client: Client, data: DataStore, ep: str, workers: dict[str, Any]
) -> None:
    """Two workers (one per shard) hold an APP value hot; a host write reaches both: each
    serves the new value within 2 s of ``DataStore.set`` returning (far inside the 5 s backstop
    after which an entry is read again anyway), and the time is logged."""
    for shop in (SHOP0, SHOP1):
        deployer.deploy(ep, shop, guests.ECHO, input_query=SHOP_ONLY)
    data.set("default", "k", "old")

    def seen(shop: str) -> Any:
        outcome = client.run(ep, shop, {}, strict=True, timeout=10)
        assert outcome.output is not None
        return outcome.output["a"]

    for _ in range(3):  # both hold it now (and read it from memory)
        assert [seen(SHOP0), seen(SHOP1)] == ["old", "old"]
    written = time.monotonic()
    data.set("default", "k", "new")
    waiting = {SHOP0, SHOP1}
    took: dict[str, float] = {}
    while waiting:
        for shop in sorted(waiting):
            if seen(shop) == "new":
                took[shop] = time.monotonic() - written
                waiting.discard(shop)
        assert time.monotonic() - written < 2.0, f"{sorted(waiting)} still serve the old value"
    log.info("store_write_seen", ms={shop: round(s * 1000, 2) for shop, s in took.items()})
    served = {client.run(ep, shop, {}, strict=True).worker for shop in (SHOP0, SHOP1)}
    assert len(served) == 2  # two worker processes, each told


def test_a_session_value_is_not_served_past_its_ttl(
    deployer: Registry, client: Client, ep: str, pool_settings: Settings, redis_url: str
) -> None:
    """A session read (and held) by the worker is null once the session's TTL has passed in
    Redis, which tells nobody: the worker never holds it past its PTTL."""
    deployer.deploy(ep, SHOP1, guests.ECHO, input_query=SESSION_ONLY)
    write_session(pool_settings, "default", SHOP1, "short", "seen", "viewed p9")
    name = pool_settings.keys.data_session("default", SHOP1, "short")
    raw = redis.Redis.from_url(redis_url)
    assert raw.pexpire(name, 600)  # as if its TTL were 0.6 s, with no message when it passes
    first = client.run(ep, SHOP1, {}, session="short", strict=True, timeout=10)
    assert first.output == {"seen": "viewed p9"}
    assert client.run(ep, SHOP1, {}, session="short", strict=True).output == {"seen": "viewed p9"}
    while raw.exists(name):
        time.sleep(0.05)
    assert client.run(ep, SHOP1, {}, session="short", strict=True, timeout=10).output == {"seen": None}


def test_replay_of_a_run_that_read_data_is_exact_after_the_data_changed(
    deployer: Registry,
    client: Client,
    data: DataStore,
    redis_url: str,
    pool_settings: Settings,
    sandbox: Sandbox,
) -> None:
    """The captured input holds the data the script saw, so replay gives the same output after
    the data changed, while a new call sees the new data."""
    deployer.define_extension_point("sr_capture", input_graphql=SDL, capture_rate=1.0)
    shop = shop_on(1, 2, prefix="sr", skip=1)
    deployer.deploy("sr_capture", shop, guests.ECHO, input_query=SHOP_ONLY)
    data.set("default", "k", {"rate": 1}, shop=shop)
    outcome = client.run("sr_capture", shop, {}, strict=True, timeout=10)
    assert outcome.output is not None and outcome.output["v"] == {"rate": 1}
    store = CaptureStore(redis.Redis.from_url(redis_url), pool_settings)
    deadline = time.monotonic() + 10
    while not (summaries := store.summaries(ep="sr_capture", shop_id=shop)):
        assert time.monotonic() < deadline, "never captured"
        time.sleep(0.02)
    run = store.get(summaries[0].id)
    assert json.loads(run.input)["v"] == {"rate": 1}
    data.set("default", "k", {"rate": 2}, shop=shop)
    deadline = time.monotonic() + 5
    while client.run("sr_capture", shop, {}, strict=True, timeout=10).output["v"] != {"rate": 2}:
        assert time.monotonic() < deadline, "the new value never reached the worker"
    again = replay(run, deployer, sandbox)
    assert again.identical and again.result.output == outcome.output


def test_the_schema_offers_store_at_a_metafield_s_cost_and_refuses_a_conflicting_one() -> None:
    """Every input schema gains ``store`` (with ``JSON`` and ``StoreScope``) unless it declares
    them identically; a selection costs 3; a ``store`` or ``StoreScope`` of another shape is
    refused at its declaration."""
    schema = InputSchema.from_sdl(SDL)
    assert InputQuery.compile(schema, 'query { store(scope: APP, key: "x") }').cost == 3
    declared = (
        "scalar JSON\nenum StoreScope { APP SHOP SESSION }\n"
        "type Input { cart: Int  store(scope: StoreScope!, key: String!): JSON }"
    )
    assert (
        InputQuery.compile(InputSchema.from_sdl(declared), 'query { store(scope: SHOP, key: "y") }').cost == 3
    )
    for sdl, line in (
        ("type Input { a: Int\n  store(key: String!): String }", 2),
        ("enum StoreScope { APP SHOP }\ntype Input { a: Int }", 1),
        ("type JSON { a: Int }\ntype Input { a: Int }", 1),
    ):
        with pytest.raises(InvalidArgument) as refused:
            InputSchema.from_sdl(sdl)
        assert refused.value.detail["line"] == line


def test_store_below_the_root_is_refused_at_compile() -> None:
    """``store`` is resolved by the worker only in the operation's root selection set (a
    fragment spread or inlined there counts as root); selected below it, where ``Input`` is
    reached from a field, the value would come from the host's JSON: refused where it is."""
    schema = InputSchema.from_sdl("type Input { cart: Cart, parent: Input }\ntype Cart { total: Int }")
    fine = (
        'query { a: store(scope: SHOP, key: "k") ...F ... on Input { c: store(scope: APP, key: "k") }'
        ' parent { cart { total } } }\nfragment F on Input { b: store(scope: SESSION, key: "k") }'
    )
    assert InputQuery.compile(schema, fine).cost > 0
    for query, line, column in (
        ('query { parent { s: store(scope: SHOP, key: "k") } }', 1, 18),
        ('query { cart { total }\n  parent { parent { store(scope: APP, key: "k") } } }', 2, 21),
        ('query { parent { ... on Input { store(scope: APP, key: "k") } } }', 1, 33),
        # The same fragment spread at the root is fine; spread below it, it is not.
        ('query { ...F parent { ...F } }\nfragment F on Input { store(scope: APP, key: "k") }', 2, 23),
    ):
        with pytest.raises(InvalidInputQuery) as refused:
            InputQuery.compile(schema, query)
        assert refused.value.detail["problem"] == "store is selectable only at the root"
        assert (refused.value.detail["line"], refused.value.detail["column"]) == (line, column)
    # A field named store on another type is that type's own.
    other = InputSchema.from_sdl("type Input { cart: Cart }\ntype Cart { store: String }")
    assert InputQuery.compile(other, "query { cart { store } }").cost >= 0


def test_one_message_drops_every_key_it_lists_from_a_worker_s_cache(pool_settings: Settings) -> None:
    """A call's one invalidation, through the listener as a worker receives it, drops every
    entry it lists (APP, SHOP and SESSION) and nothing else; a message about data the worker
    holds nothing of drops nothing."""
    client = redis.Redis.from_url(pool_settings.redis_url)
    keys = pool_settings.keys
    digest = Keys.session_digest("tok")
    try:
        writes = [(APP, "k1", b"1"), (SHOP, "k2", b"2"), (SESSION, "k3", b"3"), (SHOP, "kept", b"4")]
        assert apply_writes(client, keys, "inv", "s1", "tok", writes, channel="") is None
        cache = StoreCache(client, keys, backstop_s=60)
        listener = InvalidationListener(
            pool_settings.redis_url, "unused", lambda ep, shop: None, on_data=cache.invalidate
        )
        reads = [
            (APP, "s1", None, "k1"),
            (SHOP, "s1", None, "k2"),
            (SESSION, "s1", digest, "k3"),
            (SHOP, "s1", None, "kept"),
        ]
        for scope, shop, session, key in reads:
            assert cache.read(scope, "inv", shop, session, key) is not None
        assert cache.stats().entries == 4
        listener.apply(invalidation_message("other", "s1", None, [(SHOP, "k2")]).encode())
        listener.apply(invalidation_message("inv", "s2", None, [(SHOP, "k2")]).encode())
        assert cache.stats().entries == 4
        message = invalidation_message("inv", "s1", digest, [(APP, "k1"), (SHOP, "k2"), (SESSION, "k3")])
        listener.apply(message.encode())
        stats = cache.stats()
        assert stats.entries == 1 and stats.bytes == len(b"4") + ENTRY_OVERHEAD
        misses = sum(stats.misses.values())
        for scope, shop, session, key in reads:
            cache.read(scope, "inv", shop, session, key)
        assert sum(cache.stats().misses.values()) == misses + 3
    finally:
        client.close()


@pytest.mark.parametrize("session", ["", "x" * 257, "tab\there", "new\nline", 42, b"bytes"])
def test_a_bad_session_is_refused_before_anything_is_sent(client: Client, ep: str, session: Any) -> None:
    """A session is a str of 1..256 printable characters, else ``invalid_argument``."""
    with pytest.raises(InvalidArgument, match="session"):
        client.run(ep, SHOP0, {}, session=session)


def test_a_job_carries_its_session_only_when_it_has_one() -> None:
    """``Job.session`` is absent from the wire when None, and checked when a message has one;
    a shadow sample carries it, and one from before sessions still reads."""
    job = Job("id", "ep", "s", b"{}", 1.0, 0.0)
    assert "session" not in job.to_wire()
    with_session = Job("id", "ep", "s", b"{}", 1.0, 0.0, session="tok")
    assert Job.from_wire(with_session.to_wire()) == with_session
    for bad in (7, "", "x" * 257, "a\x00b"):
        with pytest.raises(ValueError, match="session"):
            Job.from_wire({**job.to_wire(), "session": bad})
    live = Execution(True, {"a": 1}, None, ExecutionReport())
    assert Sample.unpack(Sample("ep", "s", b"{}", live, "tok").pack()).session == "tok"
    old = msgpack.packb(("ep", "s", b"{}", live.to_wire()), use_bin_type=True)
    assert Sample.unpack(old).session is None
