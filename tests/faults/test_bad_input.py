"""Scenario 7: mistakes in host calls raise named errors before anything reaches Redis."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import hashlib
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from scriptpool.config import Limits, Settings
from scriptpool.config.errors import (
    InputTooLarge,
    InvalidArgument,
    InvalidInput,
    ScriptpoolError,
    UnknownExtensionPoint,
)
from scriptpool.engine import Sandbox
from scriptpool.producer import Client
from scriptpool.registry import Registry
from tests import guests
from tests.faults.conftest import Recorder
from tests.pool import WorkerProcess, pool_fixtures, shop_on

SHARDS = 3  # workers on shards 0 and 1; shard 2 has none, so a job enqueued there would stay put
settings, workers = pool_fixtures(
    SHARDS, {"bad0": [0], "bad1": [1]}, redis="private_redis", settings="settings"
)
TITLE = "Bad input from host code"
TINY_INPUT = 1024  # the input limit of the `tiny` EP
LIMIT = Limits().input_bytes
# Commands that push onto a list: enqueueing a job (LPUSH) or a reply (RPUSH).
LIST_PUSHES = ("lpush", "rpush", "lpushx", "rpushx", "linsert", "lset")
# Keys whose value changes on a timer, compared by existence only: worker heartbeats, and the
# deadlines kombu refreshes for the bindings of the workers' remote-control queues (which expire).
# kombu's restore lock exists only for moments, so it is not compared at all.
VOLATILE_VALUE = ("sp:worker:", "_kombu.binding_deadlines")
TRANSIENT = {"unacked_mutex"}
# Usage counts of the good calls made before the bad ones: workers send them every 2 s, so they
# may land while the bad calls are tried (a bad call never reaches a worker, so adds none).
USAGE = ("sp:usage:", "sp:usage-shops:")


def _circular_list() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _circular_dict() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


# (label, input) pairs that JSON cannot encode.
UNSERIALISABLE: list[tuple[str, Callable[[], Any]]] = [
    ("set", lambda: {"x": {1, 2}}),
    ("frozenset", lambda: frozenset({1})),
    ("object", lambda: {"when": object()}),
    ("complex", lambda: 1j),
    ("bytes inside a dict", lambda: {"b": b"raw"}),
    ("datetime", lambda: {"at": datetime.datetime(2026, 1, 1)}),
    ("Decimal", lambda: {"price": decimal.Decimal("9.99")}),
    ("NaN", lambda: float("nan")),
    ("nested NaN", lambda: {"a": [1.0, float("nan")]}),
    ("infinity", lambda: {"a": float("inf")}),
    ("minus infinity", lambda: [float("-inf")]),
    ("tuple key", lambda: {(1, 2): 3}),
    ("object key", lambda: {object(): 1}),
    ("circular list", _circular_list),
    ("circular dict", _circular_dict),
    ("function", lambda: {"f": len}),
    ("lambda", lambda: lambda: None),
    ("generator", lambda: (i for i in range(3))),
    ("class", lambda: {"cls": Client}),
    ("int over 4300 digits", lambda: 10**5000),
    ("lone surrogate", lambda: {"s": "\ud800"}),
    ("exception", lambda: ValueError("x")),
]
# (label, EP, input) over the EP's input limit.
OVERSIZED: list[tuple[str, str, Any]] = [
    ("200 kB string", "test", {"x": "y" * 200_000}),
    ("limit + 1 bytes exactly", "test", "x" * (LIMIT - 1)),  # two quotes make it LIMIT + 1
    ("multi-byte characters", "test", "é" * (LIMIT // 2 + 1)),  # fewer characters than bytes
    ("many small keys", "test", {f"k{i}": i for i in range(20_000)}),
    ("pre-serialised bytes", "test", b"[" + b"1," * LIMIT + b"1]"),
    ("lowered EP limit + 1 byte", "tiny", "x" * (TINY_INPUT - 1)),
]
UNKNOWN_EPS = ["nope", "discount", "test-2"]
BAD_EPS: list[Any] = [
    "",
    "Test",
    "te st",
    "x" * 65,
    "test\n",
    "../test",
    "test:1",
    "tést",
    None,
    7,
    b"test",
    True,
]
BAD_SHOPS: list[Any] = [
    "", " ", "   ", "\t", "\n", "x" * 10_000, "x" * 129, "a\x00b", "shop\r\n", "\x1b[31mred", "a b",
    "shop/../x", "shop:1", "*", "shop*", "shöp", "ｓｈｏｐ", "shop\u200b", "-leading", ".hidden",
    None, True, False, 1.5, -1, 10**200, float("nan"), [1], {"id": 1}, b"shop", object(),
]  # fmt: skip
BAD_TIMEOUTS: list[Any] = [
    0, 0.0, -0.0, -1, -0.001, float("-inf"), float("nan"), True, False, "1", "0.5", b"1", [1], 1j,
    decimal.Decimal("1"),
]  # fmt: skip


@pytest.fixture(scope="module")
def shops(settings: Settings, sandbox: Sandbox) -> dict[int, str]:
    registry = Registry(redis.Redis.from_url(settings.redis_url), settings, sandbox)
    registry.define_extension_point("test")
    registry.define_extension_point("tiny", limits={"input_bytes": TINY_INPUT})
    found = {shard: shop_on(shard, SHARDS, prefix="bad-input") for shard in range(SHARDS)}
    for shop in found.values():
        registry.deploy("test", shop, guests.ECHO)
        registry.deploy("tiny", shop, guests.ECHO)
    return found


def snapshot(store: redis.Redis) -> dict[str, tuple[Any, ...]]:
    """Every key (SCAN) with its type, each list's length, and a digest of its value."""
    seen: dict[str, tuple[Any, ...]] = {}
    for raw in store.scan_iter(count=1000):
        key = raw.decode(errors="replace")
        if key in TRANSIENT or key.startswith(USAGE):
            continue
        kind = store.type(raw).decode()
        if key.startswith(VOLATILE_VALUE):
            seen[key] = (kind,)
            continue
        if kind == "list":
            value: Any = [store.llen(raw), store.lrange(raw, 0, -1)]
        elif kind == "string":
            value = store.get(raw)
        elif kind == "set":
            value = sorted(store.smembers(raw))
        elif kind == "hash":
            value = sorted(store.hgetall(raw).items())
        elif kind == "zset":
            value = store.zrange(raw, 0, -1, withscores=True)
        else:
            value = None
        seen[key] = (
            kind,
            store.llen(raw) if kind == "list" else None,
            hashlib.sha256(repr(value).encode()).hexdigest(),
        )
    return seen


def list_pushes(store: redis.Redis) -> int:
    """How many list-push commands this Redis has run so far."""
    stats = store.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in LIST_PUSHES)


def test_every_bad_call_raises_a_named_error_and_leaves_redis_untouched(
    settings: Settings, workers: dict[str, WorkerProcess], shops: dict[int, str], reliability: Recorder
) -> None:
    """Unserialisable and oversized input, unknown and malformed EPs, empty, huge, control-character
    and non-string shop ids, and zero, negative, NaN, bool and non-number timeouts, each through
    ``run`` and ``run_async`` on shops of a served shard and of a shard without workers: every
    call raises its named error (InvalidInput, InputTooLarge, UnknownExtensionPoint,
    InvalidArgument), Redis runs no list push meanwhile, and a SCAN of every key with each list's
    length and a digest of each value is identical before and after; the breaker stays closed."""
    store = redis.Redis.from_url(settings.redis_url)
    cases: list[tuple[str, dict[str, Any], type[ScriptpoolError]]] = []
    for shard in (0, 2):
        shop = shops[shard]
        for label, make in UNSERIALISABLE:
            cases.append((f"input {label}", {"ep": "test", "shop_id": shop, "input": make()}, InvalidInput))
        for label, ep, payload in OVERSIZED:
            cases.append((f"input {label}", {"ep": ep, "shop_id": shop, "input": payload}, InputTooLarge))
        for ep in UNKNOWN_EPS:
            cases.append((f"ep {ep!r}", {"ep": ep, "shop_id": shop, "input": {}}, UnknownExtensionPoint))
        for ep in BAD_EPS:
            cases.append((f"ep {ep!r:.40}", {"ep": ep, "shop_id": shop, "input": {}}, InvalidArgument))
        for timeout in BAD_TIMEOUTS:
            kwargs = {"ep": "test", "shop_id": shop, "input": {}, "timeout": timeout}
            cases.append((f"timeout {timeout!r}", kwargs, InvalidArgument))
    for bad in BAD_SHOPS:
        cases.append((f"shop {bad!r:.40}", {"ep": "test", "shop_id": bad, "input": {}}, InvalidArgument))

    with Client(settings) as client:
        # The boundary passes, and the client, its publisher and the workers are all warm.
        exact = "x" * (TINY_INPUT - 2)
        for shard in (0, 1):
            outcome = client.run("tiny", shops[shard], exact, timeout=10)
            assert (outcome.status, outcome.output) == ("ok", exact), outcome.error
        # A job parked on the unserved shard, so its queue is a list that exists with length 1.
        parked = client.run("test", shops[2], {"parked": True}, timeout=0.05)
        assert parked.error_code == "timeout"
        time.sleep(0.2)
        queues = [settings.keys.queue(shard) for shard in range(SHARDS)] + [
            settings.keys.replies(client.client_id)
        ]
        lengths_before = [store.llen(name) for name in queues]
        before, pushes_before = snapshot(store), list_pushes(store)

        raised: dict[str, int] = {}
        slowest_ms = 0.0
        for label, kwargs, expected in cases:
            for mode in ("run", "run_async"):
                started = time.perf_counter()
                with pytest.raises(ScriptpoolError) as info:
                    if mode == "run":
                        client.run(**kwargs, fallback="fb")
                    else:
                        asyncio.run(client.run_async(**kwargs, fallback="fb"))
                slowest_ms = max(slowest_ms, (time.perf_counter() - started) * 1000)
                assert type(info.value) is expected, (label, mode, info.value)
                assert info.value.code == expected.code
                raised[info.value.code] = raised.get(info.value.code, 0) + 1

        pushes_after, after = list_pushes(store), snapshot(store)
        lengths_after = [store.llen(name) for name in queues]
        changed = sorted(
            set(before) ^ set(after) | {k for k in before.keys() & after.keys() if before[k] != after[k]}
        )
        assert pushes_after == pushes_before, "something was enqueued or replied to"
        assert changed == []
        assert lengths_after == lengths_before == [0, 0, 1, 0]  # shards 0, 1, 2, and our reply list

        # Caller mistakes are not the script's fault: its breaker stays closed, calls go through.
        assert all(client.breaker_state(shops[shard], "test") == "closed" for shard in (0, 2))
        outcome = client.run("test", shops[0], {"after": "bad input"}, timeout=10)
        assert (outcome.status, outcome.output) == ("ok", {"after": "bad input"})

    lists = sum(1 for value in before.values() if value[0] == "list")
    reliability(
        7,
        TITLE,
        load=(
            "one Client with 2 solo workers running (3 shards, shard 2 unserved); every case via run and"
            " run_async, on a served and an unserved shard's shop"
        ),
        fault=(
            f"{len(UNSERIALISABLE)} unserialisable inputs, {len(OVERSIZED)} oversized inputs,"
            f" {len(UNKNOWN_EPS)} unknown and {len(BAD_EPS)} malformed EPs, {len(BAD_SHOPS)} bad shop ids"
            f" (empty, whitespace, 10 kB, control characters, non-strings), {len(BAD_TIMEOUTS)} bad timeouts"
            " (zero, negative, NaN, bool, non-numbers)"
        ),
        asserted=(
            "each raises its exact named error class before enqueue; no list push in Redis; every key,"
            " list length and value digest identical before and after; breaker closed afterwards"
        ),
        figures={
            "cases tried (run + run_async)": sum(raised.values()),
            "named errors raised": ", ".join(f"{code} {n}" for code, n in sorted(raised.items())),
            "list pushes during the bad calls": pushes_after - pushes_before,
            "keys compared (lists among them)": f"{len(before)} ({lists})",
            "queue and reply list lengths before / after": f"{lengths_before} / {lengths_after}",
            "keys changed": len(changed),
            "slowest rejection, ms": round(slowest_ms, 2),
        },
    )


def test_deeply_nested_input_is_invalid_input(settings: Settings, shops: dict[int, str]) -> None:
    """Input nested 100,000 levels deep (200 kB of brackets) raises InvalidInput, not RecursionError."""
    nested: list[Any] = []
    for _ in range(100_000):
        nested = [nested]
    with Client(settings) as client, pytest.raises(InvalidInput):
        client.run("test", shops[0], nested)


@pytest.mark.parametrize("timeout", [math.inf, 1e300], ids=["inf", "1e300"])
def test_an_endless_timeout_is_refused_before_enqueue(
    settings: Settings, workers: dict[str, WorkerProcess], shops: dict[int, str], timeout: float
) -> None:
    """A timeout that is infinite or too large to wait for raises InvalidArgument before anything
    is enqueued, as zero and negative ones do."""
    store = redis.Redis.from_url(settings.redis_url)
    with Client(settings) as client:
        pushes = list_pushes(store)
        with pytest.raises(InvalidArgument):
            client.run("test", shops[0], {}, timeout=timeout)
        assert list_pushes(store) == pushes
