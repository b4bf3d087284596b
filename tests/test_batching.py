"""Coalescing calls per shard: the lane's rules in isolation, then through real Celery workers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import pytest
import redis

from config import Reply, Settings
from engine import Sandbox
from producer import BatchPolicy, Client
from producer._batching import Lane, Message
from producer._replies import Waiter
from registry import Registry
from tests import guests
from tests.pool import WorkerProcess, pool_fixtures, shop_on
from workers._backend import ReplyPusher, failure_reply

# -- the lane, with a fake publisher -----------------------------------------------------------


@dataclass
class _Job:
    id: str
    deadline: float
    input: bytes = b"{}"


@dataclass
class _Call:
    job: _Job
    waiter: Waiter = field(default_factory=Waiter)


class _Harness:
    """A lane whose publishes are recorded, and fail on demand."""

    def __init__(self, policy: BatchPolicy | None = None) -> None:
        self.published: list[tuple[list[str], bool]] = []
        self.failing = False
        self.deferred = False  # hold background work until run_background (else run it at once)
        self.background: list[Callable[[], None]] = []
        self.lane = Lane(
            policy or BatchPolicy(),
            self._publish,
            lambda calls, exc: [c.waiter.fail(str(exc)) for c in calls],
            self._later,
            (ConnectionError,),
        )

    def _later(self, work: Callable[[], None]) -> None:
        self.background.append(work)
        if not self.deferred:
            self.run_background()

    def _publish(self, calls: list[_Call], announce: bool) -> None:
        if self.failing:
            raise ConnectionError("redis is down")
        self.published.append(([c.job.id for c in calls], announce))

    def call(self, name: str, timeout: float = 5.0, size: int = 2) -> _Call:
        call = _Call(_Job(name, time.time() + timeout, b"x" * size))
        self.lane.submit(call)  # type: ignore[arg-type]
        return call

    def run_background(self) -> None:
        while self.background:
            self.background.pop(0)()


def _message(call: _Call) -> Message:
    assert isinstance(call.waiter.listener, Message)
    return call.waiter.listener


def test_idle_lane_publishes_each_call_at_once() -> None:
    h = _Harness()
    a = h.call("a")
    assert h.published == [(["a"], False)]  # alone, and no announcement asked for
    _message(a).replied()
    h.call("b")
    assert h.published[-1] == (["b"], False)  # a's reply freed the lane: b goes at once


def test_calls_behind_an_untaken_message_leave_together_when_it_is_taken() -> None:
    h = _Harness()
    a = h.call("a")
    h.call("b")
    h.call("c")
    assert h.published == [(["a"], False)]
    assert h.lane.waiting() == 2
    _message(a).taken()  # the worker announced it took a's message
    assert h.published[-1] == (["b", "c"], True)  # a is in flight: ask to hear when taken
    assert h.lane.waiting() == 0
    _message(a).replied()  # a later reply to a taken message releases nothing twice
    assert len(h.published) == 2
    assert (h.lane.messages, h.lane.jobs) == (2, 3)


def test_first_reply_releases_when_no_announcement_came() -> None:
    h = _Harness()
    a = h.call("a")
    h.call("b")
    _message(a).replied()
    assert h.published[-1] == (["b"], False)  # a is answered: nothing else in flight


def test_stale_calls_are_never_published() -> None:
    h = _Harness()
    a = h.call("a")
    h.call("stale", timeout=-1)
    h.call("live")
    _message(a).taken()
    assert h.published[-1][0] == ["live"]


def test_message_size_is_capped_by_jobs_and_bytes() -> None:
    h = _Harness(BatchPolicy(window=1, max_jobs=2, max_input_bytes=10))
    a = h.call("a")
    b, _, d = (h.call(name) for name in "bcd")
    h.call("big", size=9)
    _message(a).taken()
    assert h.published[-1][0] == ["b", "c"]  # max_jobs
    _message(b).taken()
    assert h.published[-1][0] == ["d"]  # "big" would pass max_input_bytes together with d
    _message(d).taken()
    assert h.published[-1][0] == ["big"]  # alone, a call goes whatever its size


def test_when_every_caller_of_a_message_gives_up_the_next_goes_out_in_the_background() -> None:
    """A message on a shard with no worker is never taken; once all its callers time out, it
    stops holding the lane, and what waits is published off the giving-up caller's thread."""
    h = _Harness()
    h.deferred = True
    a = h.call("a")
    h.call("b")
    _message(a).expired()
    assert h.published == [(["a"], False)]  # not from the caller's thread
    h.run_background()
    assert h.published[-1][0] == ["b"]


def test_a_taken_message_lets_the_next_go_from_the_background() -> None:
    """The reply dispatcher only notices; the LPUSH happens on another thread, so replies keep
    flowing while it is slow."""
    h = _Harness()
    h.deferred = True
    a = h.call("a")
    h.call("b")
    _message(a).taken()
    assert h.published == [(["a"], False)]
    h.run_background()
    assert h.published[-1] == (["b"], True)


def test_a_failed_publish_fails_its_calls_and_the_lane_goes_on() -> None:
    h = _Harness()
    h.failing = True
    a = h.call("a")
    assert a.waiter.failure == "redis is down"
    assert a.waiter.wait(0) is None and a.waiter.listener is None
    h.failing = False
    b = h.call("b")  # the slot was given back
    assert h.published == [(["b"], False)]
    c = h.call("c")
    h.failing = True
    _message(b).taken()
    assert c.waiter.failure == "redis is down"
    h.failing = False
    h.call("d")
    assert h.published[-1] == (["d"], True)  # b is still in flight


def test_window_zero_turns_batching_off() -> None:
    h = _Harness(BatchPolicy(window=0))
    for name in "abc":
        h.call(name)
    assert [ids for ids, _ in h.published] == [["a"], ["b"], ["c"]]


def test_a_reply_the_wire_cannot_carry_is_that_jobs_worker_error_and_the_next_reply_goes_out(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A batch's replies go out one by one on a real Redis: one that MessagePack cannot pack
    (an integer past 64 bits, which output decoding no longer lets through) becomes that job's
    ``worker_error`` instead of an exception ending the batch, and the next job's reply follows."""
    reply_to = settings.keys.replies("unpackable")
    good = Reply("j2", None, None, 1, "w", 1.0, 2.0).to_wire()
    bad = {**good, "job_id": "j1", "execution": {"ok": True, "output": 10**30}}
    with ReplyPusher(settings).session(reply_to) as session:
        session.push(bad)
        session.push(good)
    replies = [Reply.from_wire(msgpack.unpackb(raw)) for raw in redis_client.lrange(reply_to, 0, -1)]
    assert [(r.job_id, r.error.code if r.error else None) for r in replies] == [
        ("j1", "worker_error"),
        ("j2", None),
    ]
    assert replies[0].error is not None and "OverflowError" in replies[0].error.message
    assert redis_client.ttl(reply_to) > 0


def test_a_task_failure_reads_as_the_exception_celery_encoded() -> None:
    """What escapes the task reaches the backend as Celery's encoding of the exception (a map):
    the caller's worker_error says the exception's type and message, not the map."""
    encoded = {
        "exc_type": "OverflowError",
        "exc_message": ("Integer value out of range",),
        "exc_module": "builtins",
    }
    reply = Reply.from_wire(failure_reply("t1", encoded, None))
    assert reply.error is not None
    assert (reply.error.code, reply.error.message) == (
        "worker_error",
        "OverflowError: Integer value out of range",
    )
    plain = Reply.from_wire(failure_reply("t2", KeyError("x"), None)).error
    assert plain is not None and plain.message == "KeyError: 'x'"


# -- through real workers ----------------------------------------------------------------------

SHARDS = 3  # shard 0: one worker; shard 1: two workers; shard 2: none
pool_settings, workers = pool_fixtures(SHARDS, {"b0": [0], "b1a": [1], "b1b": [1]})


@pytest.fixture
def deployer(redis_client: redis.Redis, pool_settings: Settings, sandbox: Sandbox) -> Registry:
    registry = Registry(redis_client, pool_settings, sandbox)
    registry.define_extension_point("test")
    return registry


def _hammer(client: Client, shops: list[str], threads: int, calls: int, timeout: float = 10) -> list[object]:
    failures: list[object] = []

    def caller(n: int) -> None:
        for i in range(calls):
            payload = {"t": n, "i": i}
            outcome = client.run("test", shops[(n + i) % len(shops)], payload, timeout=timeout)
            if not outcome.ok or outcome.output != payload:
                failures.append(outcome)

    pool = [threading.Thread(target=caller, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return failures


def test_busy_shard_gets_batches_and_every_caller_its_own_reply(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> None:
    """24 threads on a one-worker shard: fewer messages than calls, each reply to its caller."""
    shops = [shop_on(0, SHARDS, skip=n) for n in range(3)]
    for shop in shops:
        deployer.deploy("test", shop, guests.ECHO)
    with Client(pool_settings) as client:
        assert _hammer(client, shops, threads=24, calls=40) == []
        messages, jobs = client.batching_stats()[0]
        assert jobs == 24 * 40
        assert messages < jobs * 0.8, (messages, jobs)  # coalescing happened
        assert sum(link.replies.pending() for link in client._groups) == 0


def test_batching_keeps_both_workers_of_a_shard_busy(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> None:
    """Whichever worker takes the waiting message lets the next one go, so two workers on one
    shard both serve under load."""
    shop = shop_on(1, SHARDS)
    deployer.deploy("test", shop, guests.ECHO)
    seen: dict[str, int] = {}
    lock = threading.Lock()
    with Client(pool_settings) as client:

        def caller(n: int) -> None:
            for i in range(30):
                outcome = client.run("test", shop, {"n": n, "i": i}, timeout=10)
                assert outcome.ok and outcome.output == {"n": n, "i": i}
                with lock:
                    name = (outcome.worker or "").split("@")[0]
                    seen[name] = seen.get(name, 0) + 1

        pool = [threading.Thread(target=caller, args=(n,)) for n in range(16)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    assert set(seen) == {"b1a", "b1b"}
    assert min(seen.values()) > 16 * 30 // 10, seen


def test_dead_shard_holds_one_message_and_callers_fall_back_at_their_deadline(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, redis_client: redis.Redis
) -> None:
    """40 concurrent calls to a shard with no worker: each falls back at its own deadline, the
    queue holds a message or two, not 40 (calls behind an untaken message wait in the lane and
    are dropped there once stale), and a worker that comes later drops those as stale too."""
    shop = shop_on(2, SHARDS)
    deployer.deploy("test", shop, guests.ECHO)
    elapsed: list[float] = []
    outcomes: list[object] = []
    with Client(pool_settings) as client:

        def caller() -> None:
            started = time.perf_counter()
            outcomes.append(client.run("test", shop, {}, timeout=0.2, fallback="fb"))
            elapsed.append(time.perf_counter() - started)

        pool = [threading.Thread(target=caller) for _ in range(40)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        time.sleep(0.05)  # let the lane drop what went stale
        assert {(o.status, o.error_code, o.output) for o in outcomes} == {  # type: ignore[attr-defined]
            ("fallback", "timeout", "fb")
        }
        assert max(elapsed) < 0.2 + 0.05
        messages, jobs = client.batching_stats()[2]
        assert redis_client.llen(pool_settings.keys.queue(2)) == messages <= 3
    late = WorkerProcess(pool_settings, [2], "b2").wait_ready()
    try:
        deadline = time.monotonic() + 10
        while late.log().count("stale_job_dropped") < jobs and time.monotonic() < deadline:
            time.sleep(0.05)
        assert late.log().count("stale_job_dropped") == jobs
        assert '"event": "execution"' not in late.log()
    finally:
        late.stop()


def test_asyncio_callers_are_batched_too(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> None:
    shop = shop_on(0, SHARDS, skip=5)
    deployer.deploy("test", shop, guests.ECHO)
    with Client(pool_settings) as client:

        async def main() -> list[object]:
            return await asyncio.gather(
                *(client.run_async("test", shop, {"i": i}, timeout=10) for i in range(200))
            )

        outcomes = asyncio.run(main())
        assert [o.output for o in outcomes] == [{"i": i} for i in range(200)]  # type: ignore[attr-defined]
        messages, jobs = client.batching_stats()[0]
        assert jobs == 200 and messages < 200


def test_batching_off_is_one_message_per_call(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> None:
    shop = shop_on(0, SHARDS, skip=6)
    deployer.deploy("test", shop, guests.ECHO)
    with Client(pool_settings, batching=BatchPolicy(window=0)) as client:
        assert _hammer(client, [shop], threads=8, calls=10) == []
        assert client.batching_stats()[0] == (80, 80)


def test_stage_timings_stay_consistent_in_batches(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> None:
    """Stages add up to the total for batched calls too (time waiting in the lane is enqueue)."""
    shop = shop_on(0, SHARDS, skip=7)
    deployer.deploy("test", shop, guests.ECHO)
    outcomes: list[object] = []
    with Client(pool_settings) as client:

        def caller() -> None:
            for _ in range(10):
                outcomes.append(client.run("test", shop, {}, timeout=10))

        pool = [threading.Thread(target=caller) for _ in range(12)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    for outcome in outcomes:
        t = outcome.timings  # type: ignore[attr-defined]
        parts = t.validate_ms + t.serialize_ms + t.enqueue_ms + t.queue_wait_ms + t.execute_ms + t.result_ms
        assert abs(parts - t.total_ms) < 0.01 + 1e-6 * t.total_ms, json.dumps(outcome.to_dict(), default=str)  # type: ignore[attr-defined]


# -- the reply dispatcher, both ways of reading ------------------------------------------------


@pytest.mark.parametrize("multi_pop", [True, False], ids=["blmpop", "blpop-lpop"])
def test_dispatcher_delivers_every_reply_and_taken_marker(
    redis_client: redis.Redis, settings: Settings, multi_pop: bool
) -> None:
    """Redis 7 reads up to 256 replies per BLMPOP; Redis 6 falls back to BLPOP then LPOP. Both
    deliver each reply to its waiter, pass taken markers to the message without resolving, and
    skip malformed replies and replies nobody waits for."""
    import msgpack

    from producer._replies import ReplyDispatcher

    class Dispatcher(ReplyDispatcher):
        pass

    Dispatcher.multi_pop = multi_pop
    key = settings.keys.replies("dispatch-test")
    dispatcher = Dispatcher(settings.redis_url, key)
    try:
        taken: list[str] = []

        class Listener:
            def taken(self) -> None:
                taken.append("taken")

            def replied(self) -> None:
                taken.append("replied")

        waiters = {f"j{i}": dispatcher.expect(f"j{i}") for i in range(50)}
        waiters["j0"].listener = Listener()
        replies = [msgpack.packb({"job_id": "j0", "taken": True}), b"\xc1 junk", msgpack.packb({"x": 1})]
        replies += [msgpack.packb({"job_id": f"j{i}", "n": i}) for i in range(50)]
        replies.append(msgpack.packb({"job_id": "nobody", "n": -1}))
        redis_client.rpush(key, *replies)
        for i in range(50):
            reply = waiters[f"j{i}"].wait(5)
            assert reply is not None and reply["n"] == i
        assert taken == ["taken", "replied"]
        assert dispatcher.pending() == 0
        deadline = time.monotonic() + 5
        while redis_client.llen(key) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert redis_client.llen(key) == 0
    finally:
        dispatcher.close()
