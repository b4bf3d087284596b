"""Quotas per shop and per app (README, "Quotas"), on a real Redis: values refused by name,
hostile stored values ignored, both caps held across two workers' gates, a dead worker's slot
freed at its deadline, debt paid back by time (an injected clock: nothing here sleeps), and a
shop without quotas costing no Redis call. The worker's job loop calls the gate; these drive it
directly, as two workers of one shard would."""

from __future__ import annotations

import fnmatch
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from scriptpool.cli import main
from scriptpool.config import Keys, Settings, event_name
from scriptpool.config.errors import InvalidArgument, QuotaExceeded
from scriptpool.config.quotas import (
    MAX_DEBT_S,
    Quota,
    all_quotas,
    clear_quota,
    quotas_of,
    set_quota,
    usage_now,
)
from scriptpool.testing import EmbeddedRedis, free_port
from scriptpool.workers._quotas import QuotaGate
from tests.conftest import TEST_ARTIFACT_KEY
from tests.pool import shop_on

USAGE = 2
KEYS = Keys("sp")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingRedis(redis.Redis):
    """A client that records every command it sends (pipelines aside: the gate uses none)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]))
        return super().execute_command(*args, **options)


@pytest.fixture
def worker_clients(redis_url: str, redis_client: redis.Redis) -> Iterator[tuple[redis.Redis, redis.Redis]]:
    """Two clients on their own connections, as two workers of one shard have."""
    first, second = redis.Redis.from_url(redis_url), redis.Redis.from_url(redis_url)
    yield first, second
    first.close()
    second.close()


# -- values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_concurrent": -1}, "max_concurrent"),
        ({"max_concurrent": 100_001}, "max_concurrent"),
        ({"max_concurrent": True}, "max_concurrent"),
        ({"max_concurrent": 2.0}, "max_concurrent"),
        ({"max_concurrent": "3"}, "max_concurrent"),
        ({"max_instructions_per_s": 0}, "max_instructions_per_s"),
        ({"max_instructions_per_s": 10**13 + 1}, "max_instructions_per_s"),
        ({}, "max_concurrent, max_instructions_per_s or both"),
    ],
)
def test_a_bad_quota_is_refused_naming_its_field(fields: dict[str, Any], named: str) -> None:
    """Each value out of range, of the wrong type, or no limit at all: one InvalidArgument
    naming the field (and its range)."""
    with pytest.raises(InvalidArgument, match=named):
        Quota(**fields)


def test_the_ends_of_each_range_are_accepted() -> None:
    """1 and the maximum of each limit are quotas."""
    assert Quota(1, 1) == Quota.from_json(Quota(1, 1).to_json())
    assert Quota(100_000, 10**13).max_instructions_per_s == 10**13


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, redis_url: str, redis_client: redis.Redis) -> redis.Redis:
    """The command line pointed at the flushed test Redis."""
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", redis_url)
    monkeypatch.delenv("SCRIPTPOOL_SHARDS", raising=False)
    monkeypatch.delenv("SCRIPTPOOL_SHARD_GROUPS", raising=False)
    return redis_client


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--max-concurrent", "0"], "--max-concurrent must be a whole number from 1 to 100,000"),
        (["--max-concurrent", "abc"], "--max-concurrent must be a whole number or none"),
        (["--max-instructions-per-second", "-5"], "--max-instructions-per-second must be"),
        (["--max-instructions-per-second", "1e9"], "--max-instructions-per-second must be"),
        ([], "give --max-concurrent, --max-instructions-per-second or both"),
        (["--app", "Bad App", "--max-concurrent", "1"], "invalid app"),
    ],
)
def test_the_cli_refuses_a_bad_value_in_one_line(
    cli: redis.Redis, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    """``quota set`` with a bad value: one line ``scriptpool: invalid_argument: ...``, exit 2,
    and nothing written."""
    assert main(["quota", "set", "--shop", "7", *argv]) == USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scriptpool: invalid_argument: "), lines
    assert says in lines[0]
    assert cli.keys("*") == []


def test_the_cli_sets_changes_shows_and_clears(cli: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    """``set`` changes only the limits it names (``none`` removes one), ``show --json`` lists
    limits and use, ``status --json`` includes them, and ``clear`` removes the last trace."""
    assert main(["quota", "set", "--shop", "7", "--max-concurrent", "3"]) == 0
    assert main(["quota", "set", "--shop", "7", "--max-instructions-per-second", "5000"]) == 0
    assert main(["quota", "set", "--shop", "7", "--app", "loyalty", "--max-concurrent", "1"]) == 0
    capsys.readouterr()
    assert main(["quota", "show", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["quotas"]
    assert rows == [
        {"shop": "7", "app": None, "max_concurrent": 3, "max_instructions_per_s": 5000, "in_flight": 0,
         "tokens": 5000},
        {"shop": "7", "app": "loyalty", "max_concurrent": 1, "max_instructions_per_s": None, "in_flight": 0,
         "tokens": None},
    ]  # fmt: skip
    main(["status", "--json"])
    status = json.loads(capsys.readouterr().out)
    assert status["quotas"]["shops"] == 1 and len(status["quotas"]["targets"]) == 2
    assert main(["quota", "set", "--shop", "7", "--max-concurrent", "none"]) == 0
    assert quotas_of(cli, KEYS, "7").shop_wide == Quota(None, 5000)
    assert main(["quota", "clear", "--shop", "7", "--app", "loyalty"]) == 0
    assert main(["quota", "set", "--shop", "7", "--max-instructions-per-second", "none"]) == 0
    assert cli.keys("*") == []  # the shop left the index with its last quota


# -- what Redis holds is hostile -----------------------------------------------------------------


def test_hostile_stored_entries_are_ignored_and_logged(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries no one could have written with ``set_quota`` are left out, one log line each,
    and the gate admits by what remains; nothing raises."""
    hostile = {
        "": "not json",
        "a": '{"max_concurrent": -1}',
        "b": '{"max_concurrent": true}',
        "c": '{"max_instructions_per_s": 1e30}',
        "d": "[1]",
        "e": "[" * 100_000,
        "f": '{"max_concurrent": null, "max_instructions_per_s": null}',
        "Not An App": '{"max_concurrent": 1}',
        "ok": '{"max_concurrent": 1, "extra": "ignored"}',
    }
    redis_client.hset(KEYS.quotas("7"), mapping=hostile)
    redis_client.sadd(KEYS.quota_shops(), "7")
    with caplog.at_level(logging.WARNING, "scriptpool.quotas"):
        quotas = quotas_of(redis_client, KEYS, "7")
    assert quotas.shop_wide is None and dict(quotas.apps) == {"ok": Quota(1)}
    assert sum(event_name(r) == "quota_ignored" for r in caplog.records) == len(hostile) - 1
    gate = QuotaGate(redis_client, KEYS)
    assert gate.admit("j1", "7", ["ok", "a"], 1e300) is None
    refusal = gate.admit("j2", "7", ["ok"], float("nan"))
    assert refusal is not None and refusal.app == "ok"
    assert [q.shop for q in all_quotas(redis_client, KEYS)] == ["7"]


def test_a_hostile_bucket_is_full_or_bounded(redis_client: redis.Redis) -> None:
    """A bucket holding what we never write is full (not a number, stamped in the future); one
    in unbounded debt pays it back within ``MAX_DEBT_S``, not never."""
    set_quota(redis_client, KEYS, "7", Quota(max_instructions_per_s=100))
    clock = Clock()
    gate = QuotaGate(redis_client, KEYS, clock=clock)
    bucket = KEYS.quota_bucket("7")
    for tokens, at in (("nan", clock.now), ("inf", clock.now), ("-5", clock.now + 10**9), ("x", "y")):
        redis_client.hset(bucket, mapping={"tokens": tokens, "at": at})
        assert gate.admit("j", "7", [], clock.now + 1) is None, tokens
        assert (
            usage_now(redis_client, KEYS, [quotas_of(redis_client, KEYS, "7")], now=clock.now)[0].tokens
            == 100
        )
    redis_client.hset(bucket, mapping={"tokens": "-inf", "at": clock.now})
    assert gate.admit("j", "7", [], clock.now + 1) is not None
    clock.now += MAX_DEBT_S + 0.5
    assert gate.admit("j", "7", [], clock.now + 1) is None


# -- the caps ------------------------------------------------------------------------------------


def test_the_concurrency_cap_holds_across_two_workers(
    redis_client: redis.Redis, worker_clients: tuple[redis.Redis, redis.Redis]
) -> None:
    """Two gates on separate connections share the shop's slots: the third call is refused by
    whichever worker takes it, and a slot freed by one worker is free for the other."""
    set_quota(redis_client, KEYS, "7", Quota(max_concurrent=2))
    clock = Clock()
    one, two = (QuotaGate(client, KEYS, clock=clock) for client in worker_clients)
    deadline = clock.now + 5
    assert one.admit("j1", "7", ["a"], deadline) is None
    assert two.admit("j2", "7", ["a"], deadline) is None
    for gate in (one, two):
        refusal = gate.admit("j3", "7", ["a"], deadline)
        assert refusal is not None and (refusal.limit, refusal.maximum, refusal.app) == (
            "concurrency",
            2,
            None,
        )
        error = refusal.error()
        assert isinstance(error, QuotaExceeded) and error.fallback and "shop 7" in error.message
    assert one.admit("j1", "7", ["a"], deadline) is None  # delivered again: it holds its slot already
    one.finish("j1", "7", {"a": 10})
    assert two.admit("j3", "7", ["a"], deadline) is None


def test_racing_admissions_never_pass_the_cap(
    redis_client: redis.Redis, worker_clients: tuple[redis.Redis, redis.Redis]
) -> None:
    """Many threads of two workers admitting at once: exactly the cap's worth get in."""
    set_quota(redis_client, KEYS, "7", Quota(max_concurrent=5))
    gates = [QuotaGate(client, KEYS) for client in worker_clients]
    admitted: list[str] = []
    start = threading.Barrier(20)

    def take(n: int) -> None:
        start.wait()
        if gates[n % 2].admit(f"j{n}", "7", [], 4e9) is None:
            admitted.append(f"j{n}")

    threads = [threading.Thread(target=take, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 5
    assert redis_client.zcard(KEYS.quota_in_flight("7")) == 5


def test_a_dead_workers_slot_frees_at_the_jobs_deadline(
    redis_client: redis.Redis, worker_clients: tuple[redis.Redis, redis.Redis]
) -> None:
    """A worker that dies holding a slot (never calls finish) keeps it only until the job's
    deadline; then the other worker's next admission takes it."""
    set_quota(redis_client, KEYS, "7", Quota(max_concurrent=1))
    clock = Clock()
    dying, living = (QuotaGate(client, KEYS, clock=clock) for client in worker_clients)
    assert dying.admit("j1", "7", [], clock.now + 5) is None
    clock.now += 4.9
    assert living.admit("j2", "7", [], clock.now + 5) is not None
    clock.now += 0.2
    assert living.admit("j2", "7", [], clock.now + 5) is None
    assert redis_client.pttl(KEYS.quota_in_flight("7")) > 0  # the set itself expires when idle


def test_instruction_debt_refuses_until_time_pays_it_back(redis_client: redis.Redis) -> None:
    """The bucket holds one second of the rate; a run is charged after it, into debt; calls
    are refused until the refill brings the bucket above zero, and not a moment longer."""
    set_quota(redis_client, KEYS, "7", Quota(max_instructions_per_s=1000))
    clock = Clock()
    gate = QuotaGate(redis_client, KEYS, clock=clock)
    assert gate.admit("j1", "7", [], clock.now + 1) is None
    gate.finish("j1", "7", {"default": 3000})  # 1000 - 3000: 2000 in debt
    clock.now += 1.0
    refusal = gate.admit("j2", "7", [], clock.now + 1)
    assert (
        refusal is not None
        and refusal.limit == "instructions_per_second"
        and "1,000 in debt" in refusal.message
    )
    clock.now += 0.999
    assert gate.admit("j2", "7", [], clock.now + 1) is not None  # -1: still in debt
    clock.now += 0.01
    assert gate.admit("j2", "7", [], clock.now + 1) is None


def test_an_app_quota_only_hits_that_app_and_the_shop_pays_the_sum(redis_client: redis.Redis) -> None:
    """An app's cap refuses calls that run that app, and no other; the shop-wide bucket is
    charged what every app of the run used together."""
    set_quota(redis_client, KEYS, "7", Quota(max_concurrent=1), app="loyalty")
    set_quota(redis_client, KEYS, "7", Quota(max_instructions_per_s=1000))
    clock = Clock()
    gate = QuotaGate(redis_client, KEYS, clock=clock)
    assert gate.admit("j1", "7", ["loyalty"], clock.now + 5) is None
    assert gate.admit("j2", "7", ["tax"], clock.now + 5) is None
    refusal = gate.admit("j3", "7", ["tax", "loyalty"], clock.now + 5)
    assert refusal is not None and refusal.app == "loyalty" and "app loyalty at shop 7" in refusal.message
    assert gate.admit("j4", "7", ["tax"], clock.now + 5) is None
    gate.finish("j1", "7", {"loyalty": 600})
    gate.finish("j2", "7", {"tax": 300, "loyalty": 300})  # the two apps' 600 on the shop's bucket
    refusal = gate.admit("j5", "7", ["tax"], clock.now + 5)
    assert refusal is not None and refusal.app is None and refusal.limit == "instructions_per_second"
    assert (
        gate.admit("j6", "7", ["loyalty"], clock.now + 5) is not None
    )  # the shop's bucket, not the app's slot
    assert redis_client.zcard(KEYS.quota_in_flight("7", "loyalty")) == 0


def test_a_shop_without_quotas_costs_no_redis_call(redis_url: str, redis_client: redis.Redis) -> None:
    """A shop without quotas: one read per cache lifetime, then nothing (admit and finish); a
    shop with quotas touches only its targets that have one."""
    set_quota(redis_client, KEYS, "9", Quota(max_concurrent=10), app="loyalty")
    client = CountingRedis.from_url(redis_url)
    clock = Clock()
    gate = QuotaGate(client, KEYS, clock=clock, ttl_s=1.0)
    assert gate.admit("j0", "7", ["a"], clock.now + 1) is None
    assert client.commands == ["HGETALL"]
    for n in range(100):
        assert gate.admit(f"j{n}", "7", ["a"], clock.now + 1) is None
        gate.finish(f"j{n}", "7", {"a": 1_000_000})
    assert client.commands == ["HGETALL"]
    clock.now += 1.01
    gate.admit("j", "7", ["a"], clock.now + 1)
    assert client.commands == ["HGETALL", "HGETALL"]
    client.commands.clear()
    gate.admit("k", "9", ["tax"], clock.now + 1)  # loyalty is capped; tax and the shop are not
    gate.finish("k", "9", {"tax": 5})
    assert client.commands == ["HGETALL"]
    assert redis_client.keys(f"{KEYS.prefix}:quota-*") == [KEYS.quota_shops().encode()]
    client.close()


def test_a_redis_that_fails_lets_jobs_run_and_is_logged_once(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis unreachable: every job runs (fail open), nothing raises, one log line for the
    outage; the gate's cache keeps it from asking again for every job."""
    # No retries: redis-py's default backoff would spend seconds per command here.
    gone = CountingRedis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    clock = Clock()
    gate = QuotaGate(gone, KEYS, clock=clock)
    with caplog.at_level(logging.INFO, "scriptpool.worker"):
        for n in range(5):
            assert gate.admit(f"j{n}", "7", ["a"], clock.now + 1) is None
            gate.finish(f"j{n}", "7", {"a": 1})
            clock.now += 2
    events = [event_name(r) for r in caplog.records]
    assert events.count("quota_gate_failing_open") == 1
    assert len(gone.commands) == 5  # one read per cache lifetime, not one per call


def test_a_shops_quotas_move_with_it_and_nothing_transient_does() -> None:
    """The quota hash is among the shop's keys (a shard move copies it, as data: it goes with no
    binding); its slots and buckets, and the index, are not."""
    keys = Keys("p")
    patterns = keys.shop_key_patterns("7")
    assert any(fnmatch.fnmatchcase(keys.quotas("7"), p) for p in patterns)
    transient = [
        keys.quota_in_flight("7"),
        keys.quota_bucket("7", "a"),
        keys.quota_shops(),
        keys.quotas("17"),
    ]
    assert not any(fnmatch.fnmatchcase(k, p) for k in transient for p in patterns)
    assert keys.shop_of_key(keys.quotas("7")) == "7" and keys.is_quota(keys.quotas("7"))
    assert keys.binding_of_key(keys.quotas("7")) is None and not keys.is_data(keys.quotas("7"))


def test_clearing_the_last_quota_forgets_the_shop(redis_client: redis.Redis, settings: Settings) -> None:
    """``clear_quota`` says whether there was one, and takes the shop out of the index with its
    last quota."""
    keys = settings.keys
    set_quota(redis_client, keys, 7, Quota(max_concurrent=1))
    set_quota(redis_client, keys, 7, Quota(max_concurrent=2), app="a")
    assert clear_quota(redis_client, keys, 7) and not clear_quota(redis_client, keys, 7)
    assert redis_client.sismember(keys.quota_shops(), "7")
    assert clear_quota(redis_client, keys, 7, app="a")
    assert not redis_client.exists(keys.quota_shops(), keys.quotas("7"))


# -- shard groups --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def group_redis() -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis]]:
    """Two private Redis servers for two shard groups."""
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        yield a, b


def test_quotas_live_in_the_shops_group_and_move_with_its_shard(
    group_redis: tuple[EmbeddedRedis, EmbeddedRedis],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``quota set`` writes to the Redis of the shop's shard group (where its workers count),
    ``quota show`` lists every group's, and ``shard move`` carries a shop's quotas (and its place
    in the index) to the new group, but not its slots in flight."""
    a, b = (redis.Redis.from_url(server.url) for server in group_redis)
    for client in (a, b):
        client.flushall()
    settings = Settings(
        artifact_key=TEST_ARTIFACT_KEY,
        shards=2,
        shard_groups=f"0={group_redis[0].url};1={group_redis[1].url}",
    )
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    on_a, on_b = shop_on(0, 2), shop_on(1, 2)
    assert main(["quota", "set", "--shop", on_a, "--max-concurrent", "2"]) == 0
    assert main(["quota", "set", "--shop", on_b, "--app", "tax", "--max-concurrent", "3"]) == 0
    assert [q.shop for q in all_quotas(a, KEYS)] == [on_a] and [q.shop for q in all_quotas(b, KEYS)] == [on_b]
    capsys.readouterr()
    assert main(["quota", "show", "--json"]) == 0
    assert {(r["shop"], r["app"]) for r in json.loads(capsys.readouterr().out)["quotas"]} == {
        (on_a, None),
        (on_b, "tax"),
    }
    assert QuotaGate(a, KEYS).admit("j1", on_a, [], 4e9) is None
    assert main(["shard", "move", "0", "--to", group_redis[1].url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quotas"] == 1
    assert quotas_of(b, KEYS, on_a).shop_wide == Quota(max_concurrent=2)
    assert b.sismember(KEYS.quota_shops(), on_a) and not b.exists(KEYS.quota_in_flight(on_a))
    a.close()
    b.close()
