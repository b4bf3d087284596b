"""Coalescing calls per shard: the lane's rules in isolation, then through real Celery workers.

Long on purpose: the same lane, tested three ways in three sections (its rules against the
``_Harness`` publisher at the top, then through a three-shard pool of real workers started once
for the module, then the reply dispatcher that feeds it); a rule and the end-to-end test that
shows it holding in a pool stay side by side."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgpack
import pytest
import redis

from scriptpool.config import Settings
from scriptpool.config.wire import Reply
from scriptpool.producer import BatchPolicy, Client
from scriptpool.producer._batching import Lane, Message
from scriptpool.producer._replies import Waiter
from scriptpool.registry import Registry
from scriptpool.workers._backend import ReplyPusher, failure_reply
from tests import guests
from tests.conftest import deployer_fixture
from tests.pool import WorkerProcess, pool_fixtures, shop_on

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
    """A lane whose publishes are recorded, and fail on demand: it is the lane's outlet (where
    its messages go) and its clock (what it would have run when is recorded, run by ``ring``)."""

    def __init__(self, policy: BatchPolicy | None = None) -> None:
        self.published: list[tuple[list[str], bool]] = []
        self.failing = False
        self.deferred = False  # hold background work until run_background (else run it at once)
        self.background: list[Callable[[], None]] = []
        self.alarms: list[tuple[float, Callable[[float], None]]] = []  # what the clock would run
        self.lane: Lane[_Call] = Lane(policy or BatchPolicy(), self, self)

    def publish(self, calls: Sequence[_Call], announce: bool) -> None:
        """The outlet's publish: recorded, or a Redis error while ``failing``."""
        if self.failing:
            raise ConnectionError("redis is down")
        self.published.append(([c.job.id for c in calls], announce))

    def later(self, work: Callable[[], None]) -> None:
        """The outlet's background threads: run at once, or held while ``deferred``."""
        self.background.append(work)
        if not self.deferred:
            self.run_background()

    def schedule(self, when: float, work: Callable[[float], None]) -> None:
        """The clock's alarm: recorded for ``ring``."""
        self.alarms.append((when, work))

    def call(self, name: str, timeout: float = 5.0, size: int = 2) -> _Call:
        call = _Call(_Job(name, time.time() + timeout, b"x" * size))
        self.lane.submit(call)
        return call

    def run_background(self) -> None:
        while self.background:
            self.background.pop(0)()

    def ring(self, until: float) -> None:
        """Run what the clock would have run by ``until`` (a wall-clock time)."""
        while True:
            due = sorted((a for a in self.alarms if a[0] <= until), key=lambda a: a[0])
            if not due:
                return
            self.alarms = [a for a in self.alarms if a[0] > until]
            for when, work in due:
                work(when)

    def counts(self) -> dict[str, int]:
        return self.lane.counts()


def _message(call: _Call) -> Message[_Call]:
    assert isinstance(call.waiter.listener, Message)
    return call.waiter.listener


def _reply(call: _Call) -> None:
    """What the dispatcher does when the reply to ``call`` arrives."""
    listener = call.waiter.listener
    if listener is not None:
        listener.replied(call.waiter)


IDLE = {"untaken": 0, "outstanding": 0, "open": 0, "waiting": 0}


def test_idle_lane_publishes_each_call_at_once() -> None:
    h = _Harness()
    a = h.call("a")
    assert h.published == [(["a"], False)]  # alone, and no announcement asked for
    _reply(a)
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
    _reply(a)  # a later reply to a taken message releases nothing twice
    assert len(h.published) == 2
    assert (h.lane.messages, h.lane.jobs) == (2, 3)


def test_first_reply_releases_when_no_announcement_came() -> None:
    h = _Harness()
    a = h.call("a")
    h.call("b")
    _reply(a)
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
    h.lane.abandon(a)  # its caller gave up
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
    assert a.waiter.failure == "cannot enqueue: redis is down"
    assert a.waiter.wait(0) is None and a.waiter.listener is None
    h.failing = False
    b = h.call("b")  # the slot was given back
    assert h.published == [(["b"], False)]
    c = h.call("c")
    h.failing = True
    _message(b).taken()
    assert c.waiter.failure == "cannot enqueue: redis is down"
    h.failing = False
    h.call("d")
    assert h.published[-1] == (["d"], True)  # b is still in flight


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("window", -1, "from 0 to 1,024"),  # every call timed out
        ("window", "x", "from 0 to 1,024"),  # failed only at call time
        ("window", 1025, "from 0 to 1,024"),
        ("window", 1.0, "an integer"),
        ("window", True, "an integer"),
        ("max_jobs", 0, "from 1 to 1,024"),  # accepted, then no message could carry a job
        ("max_jobs", 1025, "from 1 to 1,024"),
        ("max_input_bytes", 0, "from 1 to 67,108,864"),
        ("max_input_bytes", 1 << 40, "from 1 to 67,108,864"),
        ("max_input_bytes", None, "an integer"),
    ],
)
def test_batch_policy_refuses_values_out_of_range(field: str, value: object, named: str) -> None:
    """Issue 21, item 6: each field is checked when the policy is built, by InvalidArgument
    naming the field and its range (window=-1 was accepted, and then every call timed out);
    both edges of each range are accepted, and a lane with the edges still publishes."""
    from scriptpool.config.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as caught:
        BatchPolicy(**{field: value})  # type: ignore[arg-type]
    assert f"BatchPolicy.{field}" in caught.value.message and named in caught.value.message
    assert caught.value.detail["field"] == field
    BatchPolicy(window=0, max_jobs=1, max_input_bytes=1)
    h = _Harness(BatchPolicy(window=1024, max_jobs=1024, max_input_bytes=64 << 20))
    h.call("a")
    assert h.published == [(["a"], False)]


def test_window_zero_turns_batching_off() -> None:
    h = _Harness(BatchPolicy(window=0))
    for name in "abc":
        h.call(name)
    assert [ids for ids, _ in h.published] == [["a"], ["b"], ["c"]]


# -- no caller loses a shard (issue 20, item 7) ------------------------------------------------


def test_callers_who_give_up_before_their_message_is_sent_leave_it_and_it_is_never_sent() -> None:
    """The lost shard: a's caller gives up, so b and c leave together from a background thread;
    their callers give up before that thread runs. Their message must not be published (a
    worker would drop it unanswered and nothing would ever free its slot), and the lane is idle."""
    h = _Harness()
    h.deferred = True
    a = h.call("a")
    b, c = h.call("b"), h.call("c")
    h.lane.abandon(a)
    assert h.counts() == {"untaken": 1, "outstanding": 2, "open": 1, "waiting": 0}  # b+c reserved
    h.lane.abandon(b)
    h.lane.abandon(c)
    assert h.counts() == IDLE
    h.run_background()
    assert h.published == [(["a"], False)]
    h.deferred = False
    h.call("d")
    assert h.published[-1] == (["d"], False)  # at once: the lane was free


def test_a_call_that_goes_stale_before_its_message_is_sent_is_left_out() -> None:
    """Only the live calls of a message are published; the stale one leaves it."""
    h = _Harness()
    h.deferred = True
    a = h.call("a")
    stale, live = h.call("stale", timeout=0.05), h.call("live")
    _message(a).taken()
    time.sleep(0.06)
    h.run_background()
    assert h.published[-1] == (["live"], True)
    assert stale.waiter.listener is None
    assert h.counts()["outstanding"] == 2  # a and live
    _reply(a)
    _reply(live)
    assert h.counts() == IDLE


def test_a_message_nobody_hears_about_frees_its_slot_at_its_deadline() -> None:
    """Neither a reply, nor a take notice, nor its callers giving up (a caller that never
    concludes): the clock still frees the slot at the message's deadline, and what waits goes."""
    h = _Harness()
    a = h.call("a", timeout=0.5)
    h.call("b", timeout=5)
    assert [when for when, _ in h.alarms] == [a.job.deadline]
    h.ring(a.job.deadline - 0.01)
    assert h.published == [(["a"], False)]  # not before
    h.ring(a.job.deadline)
    assert h.published[-1] == (["b"], False)
    assert h.counts() == {"untaken": 1, "outstanding": 1, "open": 1, "waiting": 0}
    _reply(a)  # a reply after the deadline counts nothing twice
    assert h.counts()["outstanding"] == 1
    h.ring(time.time() + 10)
    assert h.counts() == IDLE


def test_a_reconnect_resets_the_lanes_view_and_late_replies_count_nothing() -> None:
    """Replies and take notices read on a lost connection never arrive: a reconnect frees every
    slot at once; what waits goes; replies that still arrive reach their callers only."""
    h = _Harness()
    a = h.call("a")
    b = h.call("b")
    h.lane.reset()
    assert h.published[-1] == (["b"], False)
    _reply(a)
    assert h.counts() == {"untaken": 1, "outstanding": 1, "open": 1, "waiting": 0}
    _reply(b)
    assert h.counts() == IDLE


def test_a_reply_racing_its_caller_giving_up_counts_once() -> None:
    h = _Harness()
    a = h.call("a")
    b = h.call("b")
    message = _message(a)
    h.lane.abandon(a)  # the caller's wait ended first...
    message.replied(a.waiter)  # ...and the reply was read just after
    assert h.counts() == {"untaken": 1, "outstanding": 1, "open": 1, "waiting": 0}  # b, alone
    _reply(b)
    assert h.counts() == IDLE


def test_random_lane_histories_never_lose_a_slot() -> None:
    """Seeded random histories of calls, replies, take notices, give-ups, lost conclusions,
    failed publishes, slow background threads, reconnects and clock ticks. After every step the
    counters agree with the messages; no call is published twice, or after its caller gave up;
    and once every caller is done (or the clock passes every deadline), the lane is idle."""
    seed = int(time.time() * 1000) % 2**32
    rng = random.Random(seed)
    for history in range(200):
        h = _Harness(BatchPolicy(window=rng.choice([1, 1, 2, 3]), max_jobs=rng.choice([2, 64])))
        calls: list[_Call] = []
        done: set[str] = set()  # callers that concluded
        gave_up: set[str] = set()
        published: set[str] = set()
        lost = 0
        for step in range(rng.randrange(5, 60)):
            h.deferred = rng.random() < 0.5
            h.failing = rng.random() < 0.1
            live = [c for c in calls if c.job.id not in done]
            roll = rng.random()
            if roll < 0.35 or not live:
                calls.append(h.call(f"h{history}s{step}", timeout=rng.choice([-0.01, 0.001, 5, 60])))
            elif roll < 0.55:
                call = rng.choice(live)
                if isinstance(call.waiter.listener, Message):
                    _reply(call)
                    done.add(call.job.id)
            elif roll < 0.65:
                call = rng.choice(live)
                if isinstance(call.waiter.listener, Message):
                    call.waiter.listener.taken()
            elif roll < 0.8:
                call = rng.choice(live)
                h.lane.abandon(call)
                done.add(call.job.id)
                gave_up.add(call.job.id)
            elif roll < 0.85:
                done.add(rng.choice(live).job.id)  # a caller that never concludes
                lost += 1
            elif roll < 0.9:
                h.lane.reset()
            elif roll < 0.95:
                h.ring(time.time())
            else:
                h.run_background()
            now_published = {job for ids, _ in h.published for job in ids}
            assert not (now_published - published) & gave_up, (seed, history)
            published = now_published
            counts = h.counts()
            window = h.lane._policy.window
            assert 0 <= counts["untaken"] <= window, (seed, history, counts)
            assert counts["outstanding"] == sum(m.outstanding for m in h.lane._open), (seed, history)
            assert not counts["waiting"] or counts["untaken"] == window, (seed, history, counts)
        all_ids = [job for ids, _ in h.published for job in ids]
        assert len(all_ids) == len(set(all_ids)), (seed, history)
        h.failing = False
        for call in calls:  # every remaining caller concludes, one way or the other
            if call.job.id not in done:
                h.lane.abandon(call)
        h.deferred = False
        h.run_background()
        if not lost:
            assert h.counts() == IDLE, (seed, history, h.counts())
        h.ring(time.time() + 120)
        assert h.counts() == IDLE, (seed, history, h.counts())


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


deployer = deployer_fixture()


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


def _idle(client: Client, shard: int, within_s: float) -> dict[str, int]:
    """The lane's counters once idle, waiting at most ``within_s`` for them to settle."""
    lane = client._lanes[shard]
    deadline = time.monotonic() + within_s
    while lane.counts() != IDLE and time.monotonic() < deadline:
        time.sleep(0.01)
    return lane.counts()


def test_callers_giving_up_before_their_batch_is_sent_do_not_cost_the_client_its_shard(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> None:
    """Issue 20, item 7, the reproduction: the shard's worker paused (SIGSTOP), 4 calls with a
    0.2 s deadline, the worker resumed. The first call goes out alone; the other three leave
    together from a background thread when it gives up, and here that thread runs only after
    their callers gave up too (its pool is held busy: what a descheduled thread does at random,
    made certain). That message used to be published anyway, dropped by the worker unanswered,
    and hold the lane's only slot for good: every later call of the client to the shard fell
    back. Now the same client is served at once, and the lane's counters are back at zero."""
    shop = shop_on(0, SHARDS, skip=8)
    deployer.deploy("test", shop, guests.ECHO)
    worker = workers["b0"]
    with Client(pool_settings) as client:
        assert client.run("test", shop, {}, timeout=5).ok
        hold = threading.Event()
        held = [client._publisher.submit(hold.wait, 10) for _ in range(8)]
        outcomes: list[object] = []

        def caller() -> None:
            outcomes.append(client.run("test", shop, {}, timeout=0.2, fallback="fb"))

        os.killpg(worker.process.pid, signal.SIGSTOP)
        try:
            first = threading.Thread(target=caller)
            first.start()
            time.sleep(0.05)  # the others give up 50 ms after the first: their batch forms first
            others = [threading.Thread(target=caller) for _ in range(3)]
            for t in others:
                t.start()
            for t in [first, *others]:
                t.join()
        finally:
            hold.set()
            for future in held:
                future.result()
            os.killpg(worker.process.pid, signal.SIGCONT)
        assert [o.error_code for o in outcomes] == ["timeout"] * 4  # type: ignore[attr-defined]
        fresh = client.run("test", shop, {"fresh": 1}, timeout=5, fallback="fb")
        assert fresh.ok and fresh.output == {"fresh": 1}, fresh
        assert _idle(client, 0, within_s=5) == IDLE


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


class _Interrupted(Exception):
    """What the signal handler raises in the main thread while its ``run`` waits."""


def test_a_caller_interrupted_while_it_waits_lets_go_of_its_lane_and_reply_slot_at_once(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, redis_client: redis.Redis
) -> None:
    """``run`` and ``run_async`` share one body, which hears what interrupts either wait: a
    thread's (an exception raised by a signal handler, as Ctrl-C raises KeyboardInterrupt) and a
    task's (cancellation). Either way the exception reaches the caller, and the call leaves its
    lane and its reply slot then, not at its 30 s deadline (shard 2 has no worker: nothing else
    would free them before)."""
    shop = shop_on(2, SHARDS, skip=9)
    deployer.deploy("test", shop, guests.ECHO)
    queue = pool_settings.keys.queue(2)
    with Client(pool_settings) as client:
        lane = client._lanes[2]

        def pending() -> int:
            return sum(link.replies.pending() for link in client._groups)

        seen: list[tuple[dict[str, int], int]] = []

        def interrupt(signum: int, frame: object) -> None:
            seen.append((lane.counts(), pending()))  # what the waiting call holds
            raise _Interrupted

        previous = signal.signal(signal.SIGUSR1, interrupt)
        # Not SIGALRM (pytest-timeout's), and aimed at this thread, whose wait it interrupts.
        alarm = threading.Timer(0.3, signal.pthread_kill, (threading.get_ident(), signal.SIGUSR1))
        try:
            alarm.start()
            started = time.monotonic()
            with pytest.raises(_Interrupted):
                client.run("test", shop, {}, timeout=30, fallback="fb")
        finally:
            alarm.cancel()
            signal.signal(signal.SIGUSR1, previous)
        assert time.monotonic() - started < 5
        assert seen == [({"untaken": 1, "outstanding": 1, "open": 1, "waiting": 0}, 1)]
        assert (lane.counts(), pending()) == (IDLE, 0)

        async def cancelled() -> tuple[dict[str, int], int]:
            task = asyncio.ensure_future(client.run_async("test", shop, {}, timeout=30, fallback="fb"))
            await asyncio.sleep(0.3)
            held = (lane.counts(), pending())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return held

        held = asyncio.run(cancelled())
        assert held == ({"untaken": 1, "outstanding": 1, "open": 1, "waiting": 0}, 1)
        assert (lane.counts(), pending()) == (IDLE, 0)
    assert redis_client.llen(queue) == 2  # both went out, one message each
    redis_client.delete(queue)  # never taken: not left for the tests after this one


# -- the reply dispatcher, both ways of reading ------------------------------------------------


@pytest.mark.parametrize("multi_pop", [True, False], ids=["blmpop", "blpop-lpop"])
def test_dispatcher_delivers_every_reply_and_taken_marker(
    redis_client: redis.Redis, settings: Settings, multi_pop: bool
) -> None:
    """Redis 7 reads up to 256 replies per BLMPOP; Redis 6 falls back to BLPOP then LPOP. Both
    deliver each reply to its waiter, pass taken markers to the message without resolving, and
    skip malformed replies and replies nobody waits for."""
    import msgpack

    from scriptpool.producer._replies import ReplyDispatcher

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

            def replied(self, waiter: Waiter) -> None:
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
