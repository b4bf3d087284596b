"""What opens a (shop, EP) circuit breaker (issue 21, item 14): the pool not answering, or not in
time, does; a script's errors on bad inputs do not, so the good inputs after them still run.
Real worker, real Redis, the host's Client with the default BreakerPolicy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scriptpool.config import Settings
from scriptpool.config.errors import ScriptpoolError, error_class_for
from scriptpool.producer import BreakerPolicy, Client
from scriptpool.registry import Registry
from tests import guests
from tests.conftest import deployer_fixture
from tests.pool import WorkerProcess, pid_of, pool_fixtures, shop_on

SHARDS = 2  # shard 0 has a worker; shard 1 none (calls there time out)
pool_settings, workers = pool_fixtures(SHARDS, {"w0": [0]})
POLICY = BreakerPolicy()  # the default: 5 failures in 10 s open it for 2 s


deployer = deployer_fixture(())  # a registry on the pool's Redis, nothing defined


@pytest.fixture
def client(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> Iterator[Client]:
    """A client with the default breaker policy."""
    with Client(pool_settings, breaker=POLICY) as c:
        yield c


def test_only_pool_failures_trip_the_breaker() -> None:
    """The flag, by code: what says the pool did not answer (in time) counts; what a script
    answers for an input does not."""
    counted = {"timeout", "broker_unavailable", "worker_error", "invalid_reply", "wall_clock_exceeded"}
    answers = {
        "runtime_error",
        "invalid_output",
        "output_too_large",
        "instruction_limit_exceeded",
        "memory_limit_exceeded",
        "stack_overflow",
        "invalid_input",
        "input_too_large",
    }
    assert {code for code in counted | answers if error_class_for(code).trips_breaker} == counted
    assert not error_class_for(ScriptpoolError.code).trips_breaker


def test_bad_inputs_do_not_turn_away_the_good_ones(client: Client, deployer: Registry) -> None:
    """Twice the threshold of inputs the script fails on (a non-zero exit, and output that
    fails the EP's output schema), in a row: each gets its own named error, never
    ``circuit_open``, the breaker stays closed, and a good input right after is served by the
    same worker process."""
    deployer.define_extension_point(
        "gate", output_schema={"type": "object", "properties": {"n": {"minimum": 0}}}
    )
    shop = shop_on(0, SHARDS)
    deployer.define_extension_point("exits")
    deployer.deploy("gate", shop, guests.digit_gate(5))  # n >= 5: prints {"n":-1}, off the schema
    deployer.deploy("exits", shop, guests.digit_gate(5, fail=True))  # n >= 5: exits 1
    good = client.run("gate", shop, {"n": 1}, timeout=5)
    assert good.ok and good.output == {"n": 1}
    for ep, code in (("gate", "invalid_output"), ("exits", "runtime_error")):
        for n in range(2 * POLICY.error_threshold):
            outcome = client.run(ep, shop, {"n": 5 + n % 5}, timeout=5)
            assert (outcome.status, outcome.error_code) == ("error", code), outcome.error
        assert client.breaker_state(shop, ep) == "closed"
        after = client.run(ep, shop, {"n": 2}, timeout=5)
        assert after.ok and after.output == {"n": 2}
        assert pid_of(after.worker) == pid_of(good.worker)


def test_pool_failures_still_open_it(client: Client, deployer: Registry) -> None:
    """A shard nobody serves (timeouts) and a script stopped by its wall clock open the breaker
    after the threshold: the next call gets ``circuit_open`` at once, nothing enqueued."""
    deployer.define_extension_point("slow", limits={"fuel": 10**15, "wall_ms": 20})
    unserved, served = shop_on(1, SHARDS), shop_on(0, SHARDS, skip=1)
    deployer.deploy("slow", unserved, guests.ECHO)
    deployer.deploy("slow", served, guests.INFINITE_LOOP)
    for shop, code, timeout in ((unserved, "timeout", 0.05), (served, "wall_clock_exceeded", 5)):
        for _ in range(POLICY.error_threshold):
            assert client.run("slow", shop, {}, timeout=timeout).error_code == code
        assert client.breaker_state(shop, "slow") == "open"
        assert client.run("slow", shop, {}, timeout=timeout).error_code == "circuit_open"
