"""Scenario 15: malformed replies and stuck lanes: no caller loses a shard.

Two ways a client's own state could cost its callers a shard. A hostile item on its reply list
once stopped the reply reader's read, losing the good replies read with it; and a batch whose
callers gave up before it was sent once held the lane's slot for good, so every later call of
that client to that shard fell back until the process restarted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from typing import Any

import msgpack
import pytest
import redis

from scriptpool.config import Settings
from scriptpool.config.wire import Taken
from scriptpool.engine import Sandbox
from scriptpool.producer import BreakerPolicy, Client, Outcome
from scriptpool.registry import Registry
from scriptpool.testing import EmbeddedRedis
from tests import guests
from tests.conftest import TEST_ARTIFACT_KEY
from tests.faults.conftest import Recorder
from tests.pool import WorkerProcess, shops_on
from tests.test_replies_hostile import MALFORMED, UNREADABLE, good_reply, packed

SHARDS = 2
TITLE = "Malformed replies and stuck lanes: no caller loses a shard"
IDLE = {"untaken": 0, "outstanding": 0, "open": 0, "waiting": 0}
NO_BREAKER = BreakerPolicy(error_threshold=10**9)
SANE_S = 5.0
CALLS_PER_THREAD = 150  # the deadline of the call that checks the shard still serves this client


@pytest.fixture(scope="module")
def settings(private_redis: EmbeddedRedis) -> Settings:
    return Settings(redis_url=private_redis.url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS)


@pytest.fixture(scope="module")
def shops(settings: Settings, sandbox: Sandbox) -> dict[int, list[str]]:
    """Echo shops per shard."""
    registry = Registry(redis.Redis.from_url(settings.redis_url), settings, sandbox)
    registry.define_extension_point("test")
    found = {shard: shops_on(shard, SHARDS, 4, prefix="bc") for shard in range(SHARDS)}
    for shop in (s for group in found.values() for s in group):
        registry.deploy("test", shop, guests.ECHO)
    return found


def _idle(client: Client, shard: int, within_s: float = 2.0) -> dict[str, int]:
    lane = client._lanes[shard]
    deadline = time.monotonic() + within_s
    while lane.counts() != IDLE and time.monotonic() < deadline:
        time.sleep(0.01)
    return lane.counts()


class _Impostor(threading.Thread):
    """Plays shard 1's worker: takes each message off its queue and answers every job in it
    with a good reply (its input echoed) or, a ``malformed`` share of the time, a malformed one
    naming the job."""

    def __init__(self, settings: Settings, reply_key: str, seed: int, malformed: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.share = malformed
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.queue = settings.keys.queue(1)
        self.reply_key = reply_key
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.good: dict[str, Any] = {}  # job id -> the output its reply carries
        self.malformed: dict[str, str] = {}  # job id -> the kind of malformed body it got

    def run(self) -> None:
        kinds = sorted(MALFORMED)
        while not self.stop.is_set():
            item = self.redis.brpop([self.queue], timeout=0.2)
            if item is None:
                continue
            envelope = json.loads(item[1])
            jobs, kwargs, _ = msgpack.unpackb(base64.b64decode(envelope["body"]), raw=False)
            out = [packed(Taken(jobs[0]["id"]).to_wire())] if kwargs.get("announce") else []
            for job in jobs:
                if self.rng.random() >= self.share:
                    self.good[job["id"]] = json.loads(job["input"])
                    out.append(packed(good_reply(job["id"], self.good[job["id"]])))
                else:
                    kind = self.malformed[job["id"]] = self.rng.choice(kinds)
                    out.append(packed(MALFORMED[kind](job["id"])))
            self.redis.rpush(self.reply_key, *out)


def test_malformed_replies_mixed_with_good_ones_cost_no_caller_its_reply(
    settings: Settings, shops: dict[int, list[str]], reliability: Recorder
) -> None:
    """Load on shard 0 through a real worker, while shard 1 is answered by an impostor that
    replies to half its jobs with a malformed body, and a third thread pushes unreadable items
    (not MessagePack, no job id, a list for a job id, extension types, nesting past the depth
    limit, 1 MiB of noise) onto the same client's reply list. Every shard-0 call gets its
    script's output; every shard-1 call gets exactly what its reply allows (ok, or
    invalid_reply at once, never a timeout); each unreadable item is counted and skipped; the
    client then serves a fresh call on each shard and its lanes are idle."""
    seed = random.randrange(2**32)
    worker = WorkerProcess(settings, [0], "bc-replies").wait_ready()
    try:
        # invalid_reply trips the breaker (like worker_error): half of shard 1's calls get it
        # here, which would open those shops' circuits and hide what is being counted.
        with Client(settings, breaker=NO_BREAKER) as client:
            dispatcher = client._groups[0].replies
            impostor = _Impostor(settings, dispatcher.reply_key, seed)
            impostor.start()
            junk_pushed = Counter[str]()
            stop_junk = threading.Event()

            def junk() -> None:
                r = redis.Redis.from_url(settings.redis_url)
                rng = random.Random(seed + 1)
                while not stop_junk.is_set():
                    kind = rng.choice(sorted(UNREADABLE))
                    r.rpush(dispatcher.reply_key, UNREADABLE[kind])
                    junk_pushed[kind] += 1
                    time.sleep(0.001)

            outcomes: dict[int, list[tuple[Any, Outcome]]] = {0: [], 1: []}

            def caller(n: int) -> None:
                shard = n % 2
                for i in range(CALLS_PER_THREAD):
                    payload = {"n": n, "i": i}
                    outcome = client.run("test", shops[shard][i % 4], payload, timeout=SANE_S, fallback="fb")
                    outcomes[shard].append((payload, outcome))

            junker = threading.Thread(target=junk)
            junker.start()
            callers = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
            for t in callers:
                t.start()
            for t in callers:
                t.join()
            stop_junk.set()
            junker.join()
            impostor.stop.set()
            impostor.join()
            deadline = time.monotonic() + 5
            while dispatcher.malformed < junk_pushed.total() and time.monotonic() < deadline:
                time.sleep(0.01)

            served = [(p, o) for p, o in outcomes[0] if o.ok and o.output == p]
            assert len(served) == len(outcomes[0]) == 4 * CALLS_PER_THREAD, f"seed {seed}"
            by_job = {o.job_id: (p, o) for p, o in outcomes[1]}
            assert set(by_job) == set(impostor.good) | set(impostor.malformed)
            assert len(by_job) == 4 * CALLS_PER_THREAD
            wrong = [
                (job, o.error_code)
                for job, (p, o) in by_job.items()
                if (job in impostor.good and not (o.ok and o.output == p))
                or (job in impostor.malformed and (o.status, o.error_code) != ("error", "invalid_reply"))
            ]
            assert not wrong, f"seed {seed}: {wrong[:5]}"
            assert dispatcher.malformed == junk_pushed.total(), f"seed {seed}"
            impostor_again = _Impostor(settings, dispatcher.reply_key, seed, malformed=0.0)
            impostor_again.start()
            try:
                for shard in range(SHARDS):
                    fresh = client.run("test", shops[shard][0], {"fresh": shard}, timeout=SANE_S)
                    assert fresh.ok and fresh.output == {"fresh": shard}, f"seed {seed}: {fresh}"
            finally:
                impostor_again.stop.set()
                impostor_again.join()
            assert [_idle(client, shard) for shard in range(SHARDS)] == [IDLE, IDLE]
    finally:
        worker.kill()

    reliability(
        15,
        TITLE,
        load=f"8 threads x {CALLS_PER_THREAD} calls, half to shard 0 (a real worker), half to shard 1 "
        "(no worker), one client",
        fault=(
            "shard 1 answered by an impostor: half its jobs get a malformed reply naming them "
            f"({len(MALFORMED)} kinds: wrong types, missing fields, non-string codes, a report that "
            "is not a map, timings as strings, unknown part status); unreadable items "
            f"({len(UNREADABLE)} kinds) pushed onto the same reply list every 1 ms"
        ),
        asserted=(
            "every good reply delivered to its caller; every malformed one gives its caller "
            "invalid_reply at once (no timeout); every unreadable item counted and skipped; the "
            "client serves a fresh call per shard after; its lanes' counters back at zero"
        ),
        figures={
            "good replies pushed (worker + impostor)": len(outcomes[0]) + len(impostor.good),
            "good replies delivered ok": len(served) + sum(1 for j in impostor.good if by_job[j][1].ok),
            "malformed replies pushed": len(impostor.malformed),
            "callers answered invalid_reply": sum(
                1 for p, o in outcomes[1] if o.error_code == "invalid_reply"
            ),
            "unreadable items pushed": junk_pushed.total(),
            "unreadable items counted and skipped": dispatcher.malformed,
            "callers that timed out": sum(
                1 for o in (*outcomes[0], *outcomes[1]) if o[1].error_code == "timeout"
            ),
        },
    )


ROUNDS = 40
KILLS = 3


def _paused(worker: WorkerProcess, paused: bool) -> None:
    os.killpg(worker.process.pid, signal.SIGSTOP if paused else signal.SIGCONT)


def _reader_connections(r: redis.Redis) -> list[int]:
    """The ids of the connections reading reply lists (no worker sends BLMPOP)."""
    return [int(c["id"]) for c in r.client_list() if c.get("cmd") == "blmpop"]


def test_pauses_deadlines_kills_and_reconnects_never_cost_a_client_its_shard(
    settings: Settings, shops: dict[int, list[str]], reliability: Recorder
) -> None:
    """A seeded random walk (the seed is printed on failure; SCRIPTPOOL_TEST_SEED replays one)
    of rounds on shard 0's one real worker: paused (SIGSTOP) or not while a burst of 1 to 8
    calls with 20 to 500 ms deadlines, some started a little apart and some cancelled asyncio
    callers, gives up; resumed after a random pause; sometimes SIGKILLed (while paused or
    not) and replaced; sometimes the client's reply reader loses its connection. After every
    round the same client's fresh call (5 s deadline) is served, and once idle the lane's
    counters are all zero."""
    seed = int(os.environ.get("SCRIPTPOOL_TEST_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    kills = set(rng.sample(range(2, ROUNDS), KILLS))
    r = redis.Redis.from_url(settings.redis_url)
    shop = shops[0][0]
    worker = WorkerProcess(settings, [0], "bc-round0").wait_ready()
    started = time.monotonic()
    figures = Counter[str]()
    try:
        # Without a breaker: the rounds' timeouts would open the shop's circuit, and calls that
        # never reach the lane test nothing.
        with Client(settings, breaker=NO_BREAKER) as client:
            assert client.run("test", shop, {}, timeout=SANE_S).ok
            for n in range(ROUNDS):
                where = f"seed {seed}, round {n}"
                pause = rng.random() < 0.7
                deadlines = [
                    rng.choice([0.02, 0.05, 0.1, 0.2, 0.2, 0.3, 0.5]) for _ in range(rng.randint(1, 8))
                ]
                gaps = [rng.choice([0.0, 0.0, 0.001, 0.01, 0.05]) for _ in deadlines]
                cancelled = [rng.random() < 0.15 for _ in deadlines]
                outcomes: list[Outcome | str] = []

                def call(deadline: float, cancel: bool, outcomes: list[Outcome | str] = outcomes) -> None:
                    if not cancel:
                        outcomes.append(client.run("test", shop, {}, timeout=deadline, fallback="fb"))
                        return

                    async def impatient() -> None:
                        coroutine = client.run_async("test", shop, {}, timeout=deadline)
                        with_timeout = asyncio.wait_for(coroutine, deadline / 4)
                        try:
                            outcomes.append(await with_timeout)
                        except TimeoutError:
                            outcomes.append("cancelled")

                    asyncio.run(impatient())

                if pause:
                    _paused(worker, True)
                    figures["rounds paused"] += 1
                try:
                    threads = []
                    for deadline, gap, cancel in zip(deadlines, gaps, cancelled, strict=True):
                        threads.append(threading.Thread(target=call, args=(deadline, cancel)))
                        threads[-1].start()
                        time.sleep(gap)
                    if pause:
                        time.sleep(rng.uniform(0.05, 0.6))
                    if n in kills:
                        worker.kill()
                        figures["workers SIGKILLed"] += 1
                    for t in threads:
                        t.join()
                finally:
                    if worker.alive:
                        _paused(worker, False)
                if rng.random() < 0.2:
                    for connection in _reader_connections(r):
                        r.client_kill_filter(_id=str(connection))
                        figures["reply reader connections killed"] += 1
                if not worker.alive:
                    worker = WorkerProcess(settings, [0], f"bc-round{n + 1}").wait_ready()
                figures["calls"] += len(deadlines)
                figures["cancelled asyncio callers"] += sum(cancelled)
                for o in outcomes:
                    if isinstance(o, Outcome):
                        assert (o.status, o.error_code) in (("ok", None), ("fallback", "timeout")), where
                        figures["calls served" if o.ok else "calls timed out"] += 1
                fresh = client.run("test", shop, {"round": n}, timeout=SANE_S, fallback="fb")
                assert fresh.ok and fresh.output == {"round": n}, f"{where}: the shard is lost: {fresh}"
                assert _idle(client, 0) == IDLE, f"{where}: {client._lanes[0].counts()}"
                figures["fresh calls served"] += 1
    finally:
        worker.kill()
    elapsed = time.monotonic() - started

    reliability(
        15,
        TITLE,
        load=f"{ROUNDS} seeded rounds of 1 to 8 calls (20 to 500 ms deadlines) on one shard, one client",
        fault=(
            "the shard's worker paused (SIGSTOP) for 50 to 600 ms while calls give up, resumed; "
            f"SIGKILLed and replaced {KILLS} times; the reply reader's connection killed at random; "
            "some asyncio callers cancelled"
        ),
        asserted=(
            "after every round the same client's fresh call is served, and the lane's counters "
            "(untaken, outstanding, open, waiting) are back at zero"
        ),
        figures={**dict(figures), "rounds": ROUNDS, "seconds for all rounds": round(elapsed, 1)},
    )


def test_a_probe_that_never_reports_does_not_keep_a_shop_refused(
    settings: Settings, shops: dict[int, list[str]], reliability: Recorder
) -> None:
    """The breaker's half-open probe is a call like any other, and its caller can vanish (an
    asyncio caller cancelled): it never reports, and the shop's calls used to be refused
    (circuit_open) by that client for good. Now the probe holds the breaker only until its
    deadline: the next call probes instead, and once a worker serves it the circuit closes."""
    policy = BreakerPolicy(error_threshold=2, error_window_s=10, cooldown_s=0.2)
    shop = shops[0][1]
    with Client(settings, breaker=policy) as client:
        for _ in range(2):  # no worker yet: two timeouts open the circuit
            assert client.run("test", shop, {}, timeout=0.05).error_code == "timeout"
        assert client.breaker_state(shop, "test") == "open"
        time.sleep(0.25)  # the cool-down

        async def cancelled_probe() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.run_async("test", shop, {}, timeout=0.3), 0.05)

        asyncio.run(cancelled_probe())
        refused_meanwhile = client.run("test", shop, {}, timeout=0.1).error_code
        time.sleep(0.3)  # past the probe's deadline
        worker = WorkerProcess(settings, [0], "bc-probe").wait_ready()
        try:
            after = client.run("test", shop, {"after": 1}, timeout=SANE_S)
        finally:
            worker.kill()
        assert refused_meanwhile == "circuit_open"  # one probe at a time, still
        assert after.ok and after.output == {"after": 1}, after
        assert client.breaker_state(shop, "test") == "closed"

    reliability(
        15,
        TITLE,
        load="one shop's calls through a breaker that opens after 2 failures (0.2 s cool-down)",
        fault="the half-open probe's asyncio caller cancelled: the probe never reports",
        asserted="calls refused only until the probe's deadline; then a call probes, is served, "
        "and the circuit closes",
        figures={"calls refused after the lost probe's deadline": int(not after.ok)},
    )
