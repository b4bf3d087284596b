"""Fair share inside a shard: the worker's start-time fair queue (pure logic), and a real worker
whose shard one shop floods while another calls now and then."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import redis

from scriptpool import BreakerPolicy, Client, Outcome, Registry, Settings
from scriptpool.producer import BatchPolicy
from scriptpool.workers._fair import FairQueue
from tests import guests
from tests.conftest import deployer_fixture
from tests.pool import WorkerProcess, pool_fixtures, shops_on

# -- the queue alone -------------------------------------------------------------------------------


def _drain(queue: FairQueue[str], costs: dict[str, float], now: float = 0.0) -> list[str]:
    """Take every job in order, charging each shop what ``costs`` says its jobs cost."""
    order = []
    while len(queue):
        taken, refused = queue.take(now)
        assert refused == []
        assert taken is not None
        item, shop = taken
        order.append(item)
        queue.charge(shop, costs[shop])
    return order


def test_equal_work_alternates_between_two_saturating_shops() -> None:
    """Two shops each with ten jobs of the same cost get every other job, whatever order they
    came in (all of A's first)."""
    queue: FairQueue[str] = FairQueue()
    for n in range(10):
        queue.add(f"a{n}", "A", deadline=1e9)
    for n in range(10):
        queue.add(f"b{n}", "B", deadline=1e9)
    order = _drain(queue, {"A": 0.001, "B": 0.001})
    shops = [item[0] for item in order]
    assert shops[:4] in (["a", "b", "a", "b"], ["b", "a", "b", "a"])
    # Over any prefix, neither shop is more than one job ahead of the other.
    for end in range(1, 21):
        assert abs(shops[:end].count("a") - shops[:end].count("b")) <= 1


def test_share_is_of_work_not_of_calls() -> None:
    """A shop whose jobs cost three times as much gets a third of the jobs while both wait:
    equal shares of the worker's time."""
    queue: FairQueue[str] = FairQueue()
    for n in range(30):
        queue.add(f"a{n}", "A", deadline=1e9)
        queue.add(f"b{n}", "B", deadline=1e9)
    costs = {"A": 0.003, "B": 0.001}
    order = _drain(queue, costs)[:40]  # both still waiting throughout
    spent = {"a": 0.0, "b": 0.0}
    for item in order:
        spent[item[0]] += costs[item[0].upper()]
    assert abs(spent["a"] - spent["b"]) <= 0.003 + 1e-9  # within one of A's jobs
    assert order.count("b0") == 1 and sum(item.startswith("b") for item in order) == 30


def test_a_shop_alone_gets_everything_in_order_and_is_never_refused() -> None:
    """Work-conserving: one shop's jobs all run, first come first served, even those already
    past their deadline (they are the worker's to drop as stale, not fairness's to refuse)."""
    queue: FairQueue[int] = FairQueue()
    for n in range(50):
        queue.add(n, "A", deadline=0.01)  # hopeless: 50 jobs of 1 ms by 10 ms
    order = []
    while len(queue):
        taken, refused = queue.take(now=0.0)
        assert refused == []
        assert taken is not None
        order.append(taken[0])
        queue.charge("A", 0.001)
    assert order == list(range(50))


def test_a_shop_back_from_idle_is_served_next_and_banks_no_credit() -> None:
    """B arrives while A floods: its job is next. Having been idle, B does not then get a run of
    jobs to make up for the time it did not use."""
    queue: FairQueue[str] = FairQueue()
    for n in range(20):
        queue.add(f"a{n}", "A", deadline=1e9)
    for _ in range(10):  # A alone for a while
        taken, _ = queue.take(0.0)
        assert taken is not None
        queue.charge("A", 0.001)
    for n in range(5):
        queue.add(f"b{n}", "B", deadline=1e9)
    order = _drain(queue, {"A": 0.001, "B": 0.001})
    assert order[0] == "b0"
    shops = "".join(item[0] for item in order[:10])
    assert "bbb" not in shops, shops


def test_late_jobs_of_the_shop_over_its_share_are_refused_and_the_other_shop_is_not() -> None:
    """A has 40 jobs of 1 ms that must all finish within 10 ms, B has one: A's jobs that cannot
    finish by then behind B's are refused, at once, and B's never is."""
    queue: FairQueue[str] = FairQueue()
    queue.add("a-first", "A", deadline=1e9)
    taken, _ = queue.take(0.0)  # A has used the worker before: its mean cost is known
    queue.charge("A", 0.001)
    for n in range(40):
        queue.add(f"a{n}", "A", deadline=100.010)
    queue.add("b0", "B", deadline=100.010)
    taken, refused = queue.take(now=100.0)
    assert taken is not None
    refused_items = {item for item, shop in refused}
    assert refused and all(item.startswith("a") for item in refused_items)
    assert "b0" not in refused_items
    # What was kept fits in the time left: at most ten jobs of 1 ms (B's among them).
    assert len(queue) + 1 <= 10
    assert len(refused_items) + len(queue) + 1 == 41


def test_a_late_job_at_the_front_is_not_refused() -> None:
    """The job with the smallest tag is never refused for fairness, late or not: nobody else
    holds it back."""
    queue: FairQueue[str] = FairQueue()
    queue.add("a0", "A", deadline=1.0)
    queue.add("b0", "B", deadline=1.0)
    taken, refused = queue.take(now=5.0)
    assert refused == [] and taken is not None and taken[0] == "a0"


# -- a real worker ---------------------------------------------------------------------------------

SHARDS = 2
# Under a prefix of its own: the worker must know it is alone on its shard (no earlier module's
# worker, or its heartbeat, on the same queue), for the bounds a lone worker has.
pool_settings, workers = pool_fixtures(SHARDS, {"f0": [0]}, key_prefix="fair")
# "heavy" allows 60M instructions: forty runs of HEAVY (some 10 ms each) are far more work than
# a deadline that leaves 100 ms after the pause (for a loaded machine's resume) and ten runs.
deployer = deployer_fixture({"test": {}, "heavy": {"limits": {"fuel": 60_000_000}}}, after=("workers",))
A, B = shops_on(0, SHARDS, 2, prefix="fair")
# About 0.2 ms of guest work on this machine: enough that order matters, not enough to be slow.
BURN = guests.echo(burn=50_000)
# About 55M instructions at "heavy" (some 10 ms here).
HEAVY = guests.echo(burn=9_000_000)
# A's breaker off: its timeouts would open it, and its calls would stop reaching the worker.
UNBROKEN = BreakerPolicy(error_threshold=10**9)
PAUSE_S = 0.5


@contextmanager
def _paused(worker: WorkerProcess) -> Iterator[None]:
    """The worker stopped (SIGSTOP) while the block queues calls for it, resumed after."""
    os.killpg(worker.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(worker.process.pid, signal.SIGCONT)


def _wait_for_queue(client: redis.Redis, queue: str, length: int) -> None:
    deadline = time.monotonic() + 10
    while client.llen(queue) < length:
        assert time.monotonic() < deadline, f"{queue} holds {client.llen(queue)} of {length} messages"
        time.sleep(0.01)


def _wait_for_shop(client: redis.Redis, queue: str, shop: str) -> None:
    """Wait until a message of ``queue`` carries a job of ``shop`` (the worker being paused, its
    message is then queued behind everything before it)."""
    deadline = time.monotonic() + 10
    while shop not in _queued_shops(client, queue):
        assert time.monotonic() < deadline, f"no message of {shop} on {queue}"
        time.sleep(0.01)


def _queued_shops(client: redis.Redis, queue: str) -> set[str]:
    shops: set[str] = set()
    for raw in client.lrange(queue, 0, -1):
        body = msgpack.unpackb(base64.b64decode(json.loads(raw)["body"]), raw=False)
        shops.update(job["shop_id"] for job in body[0])
    return shops


def _in_threads(calls: list[Any]) -> tuple[list[threading.Thread], list[Outcome]]:
    outcomes: list[Outcome] = []

    def run(call: Any) -> None:
        outcomes.append(call())

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    return threads, outcomes


def _run_order(worker: WorkerProcess, jobs: set[str | None]) -> list[str]:
    """``jobs`` in the order the worker ran them, from its log (a run's line is written after its
    reply, so this waits, up to 10 s, for the last of them)."""
    deadline = time.monotonic() + 10
    while True:
        order = [job for job in worker.executed_jobs() if job in jobs]
        if len(order) >= len(jobs) or time.monotonic() > deadline:
            return order
        time.sleep(0.02)


def test_a_quiet_shop_is_not_delayed_by_a_flood_queued_before_it(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, redis_client: redis.Redis
) -> None:
    """Thirty of A's messages wait on the shard, then B's one: the worker runs B's second (after
    the message it was handed), not thirty-first as the queue's order would have it."""
    deployer.deploy("test", A, BURN)
    deployer.deploy("test", B, guests.ECHO)
    worker = workers["f0"]
    queue = pool_settings.keys.queue(0)
    unbatched = BatchPolicy(window=0)  # a message per call: thirty messages, as thirty callers'
    with Client(pool_settings, batching=unbatched) as flood, Client(pool_settings) as quiet:
        assert flood.run("test", A, {}, timeout=10).ok and quiet.run("test", B, {}, timeout=10).ok
        with _paused(worker):
            a_threads, a_outcomes = _in_threads([lambda: flood.run("test", A, {}, timeout=20)] * 30)
            _wait_for_queue(redis_client, queue, 29)  # the paused worker may hold one already
            b_threads, b_outcomes = _in_threads([lambda: quiet.run("test", B, {}, timeout=20)])
            _wait_for_shop(redis_client, queue, B)
        for thread in a_threads + b_threads:
            thread.join()
    assert [o.status for o in a_outcomes + b_outcomes] == ["ok"] * 31
    order = _run_order(worker, {o.job_id for o in a_outcomes + b_outcomes})
    assert len(order) == 31
    assert b_outcomes[0].job_id is not None
    assert order.index(b_outcomes[0].job_id) <= 2, order


def test_over_share_calls_get_quota_exceeded_before_their_deadline(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, redis_client: redis.Redis
) -> None:
    """A queues forty calls that cannot all run within their deadline, B one: the ones of A that
    would finish too late behind B get their fallback with ``quota_exceeded`` at once, before
    their deadline; B's runs; every call of A gets exactly one answer."""
    deployer.deploy("heavy", A, HEAVY)
    deployer.deploy("test", B, guests.ECHO)
    worker = workers["f0"]
    queue = pool_settings.keys.queue(0)
    unbatched = BatchPolicy(window=0)
    with Client(pool_settings, batching=unbatched, breaker=UNBROKEN) as flood, Client(pool_settings) as quiet:
        warm = [flood.run("heavy", A, {}, timeout=10) for _ in range(5)]
        assert all(o.ok for o in warm) and quiet.run("test", B, {}, timeout=10).ok
        per_job_s = min(o.timings.execute_ms for o in warm[1:]) / 1000  # hot: no compile
        # After the pause, 100 ms and time for about ten of A's forty runs.
        timeout = PAUSE_S + 0.1 + 10 * per_job_s
        with _paused(worker):
            started = time.monotonic()
            a_threads, a_outcomes = _in_threads(
                [lambda: flood.run("heavy", A, {}, timeout=timeout, fallback="fb")] * 40
            )
            _wait_for_queue(redis_client, queue, 39)
            b_threads, b_outcomes = _in_threads([lambda: quiet.run("test", B, {}, timeout=10)])
            _wait_for_shop(redis_client, queue, B)
            time.sleep(max(0.0, PAUSE_S - (time.monotonic() - started)))
        for thread in a_threads + b_threads:
            thread.join()
    assert [o.status for o in b_outcomes] == ["ok"]
    assert len(a_outcomes) == 40
    kinds = {(o.status, o.error_code) for o in a_outcomes}
    assert kinds <= {("ok", None), ("fallback", "quota_exceeded"), ("fallback", "timeout")}, kinds
    refused = [o for o in a_outcomes if o.error_code == "quota_exceeded"]
    assert refused, Counter((o.status, o.error_code) for o in a_outcomes)
    for outcome in refused:
        assert outcome.output == "fb"
        # Decided by the worker before the deadline (the client's own wake-up comes after).
        assert outcome.timings.enqueue_ms + outcome.timings.queue_wait_ms < timeout * 1000
        assert outcome.error is not None and outcome.error.detail["reason"] == "fair_share"
    assert redis_client.llen(queue) == 0


def test_a_flooding_shop_alone_is_never_refused(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, redis_client: redis.Redis
) -> None:
    """Work conservation: the same flood with no other shop waiting is run as far as deadlines
    allow (what is late is dropped as stale), and nothing is refused for fairness."""
    deployer.deploy("heavy", A, HEAVY)
    worker = workers["f0"]
    queue = pool_settings.keys.queue(0)
    with Client(pool_settings, batching=BatchPolicy(window=0), breaker=UNBROKEN) as flood:
        warm = [flood.run("heavy", A, {}, timeout=10) for _ in range(5)]
        per_job_s = min(o.timings.execute_ms for o in warm[1:]) / 1000  # hot: no compile
        timeout = PAUSE_S + 0.1 + 10 * per_job_s
        with _paused(worker):
            started = time.monotonic()
            threads, outcomes = _in_threads([lambda: flood.run("heavy", A, {}, timeout=timeout)] * 40)
            _wait_for_queue(redis_client, queue, 39)
            time.sleep(max(0.0, PAUSE_S - (time.monotonic() - started)))
        for thread in threads:
            thread.join()
    assert len(outcomes) == 40
    assert {(o.status, o.error_code) for o in outcomes} <= {("ok", None), ("fallback", "timeout")}
    assert any(o.ok for o in outcomes)
