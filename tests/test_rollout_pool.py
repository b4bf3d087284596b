"""Verified rollouts through real workers: shadow runs after the reply, promotion and abort seen
by every worker at once, hostile candidates, and a worker killed in the middle of a shadow run."""

from __future__ import annotations

import json
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scriptpool.config import Settings
from scriptpool.producer import Client, Outcome
from scriptpool.registry import ABORTED, CANARY, PROMOTED, SHADOWING, Registry, RolloutRules, RolloutStatus
from tests import guests
from tests.conftest import deployer_fixture
from tests.pool import WorkerProcess, pool_fixtures, shop_on, start_workers

SHARDS = 2  # shard 0: two workers (every one must see a promotion), shard 1: one
pool_settings, workers = pool_fixtures(SHARDS, {"ro0a": [0], "ro0b": [0], "ro1": [1]})
INVALIDATION_S = 0.1  # what a deploy takes to reach every worker (test_pool)


# ``heavy``: room for a slow candidate (echo(burn=25M) runs about 20 ms) and a long loop (~700 ms).
deployer = deployer_fixture({"test": {}, "heavy": {"limits": {"fuel": 1_000_000_000, "wall_ms": 2000}}})


@pytest.fixture
def client(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> Iterator[Client]:
    with Client(pool_settings) as c:
        yield c


def says(value: Any) -> bytes:
    return guests.writes(json.dumps(value).encode())


# Shadow runs take only idle CPU, so next to a CPU hog judging is slow: waits are long (what they
# bound is a test that cannot finish, not a speed), and the callers keep making calls meanwhile,
# since the shadow process drops the samples it cannot keep up with.
JUDGING_S = 60.0


def wait_for_state(
    deployer: Registry,
    shop: str,
    *states: str,
    ep: str = "test",
    timeout_s: float = JUDGING_S,
    call: Callable[[], object] | None = None,
) -> RolloutStatus:
    """The rollout's status once it is in one of ``states`` (or the last seen at the timeout),
    making a ``call`` every 50 ms meanwhile when given one."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = deployer.rollouts.status(ep, shop)
        if status.state in states or time.monotonic() > deadline:
            return status
        if call is not None:
            call()
            time.sleep(0.04)
        time.sleep(0.01)


def run_ok(client: Client, shop: str, payload: Any) -> Outcome:
    outcome = client.run("test", shop, payload, timeout=5)
    assert outcome.ok, outcome.error
    return outcome


def test_an_identical_candidate_is_promoted_and_every_worker_serves_it(
    client: Client, deployer: Registry
) -> None:
    """The candidate gives the same outputs: after N comparisons it is the live binding, version
    2 with the old version in history, and both workers of the shard serve it; until then every
    caller got the live version."""
    shop = shop_on(0, SHARDS)
    live = deployer.deploy("test", shop, guests.ECHO)
    candidate = deployer.start_rollout("test", shop, guests.echo(burn=10), RolloutRules(promote_after=20))
    before = [run_ok(client, shop, {"i": i}) for i in range(40)]
    status = wait_for_state(deployer, shop, PROMOTED, call=lambda: run_ok(client, shop, {"more": 1}))
    assert status.state == PROMOTED and status.counts["match"] >= 20, status
    served_live = [o for o in before if o.report.sha256 == live.sha256]
    assert [o.output for o in before] == [{"i": i} for i in range(40)]
    # Promotion happens once N are compared, while the calls go on: each call ran one version
    # whole, the live one until promotion.
    first_new = next((n for n, o in enumerate(before) if o.report.sha256 != live.sha256), len(before))
    assert all(o.report.sha256 == live.sha256 for o in before[:first_new]) and len(served_live) >= 20
    assert all(o.report.sha256 == candidate.deployment["sha256"] for o in before[first_new:])
    time.sleep(INVALIDATION_S)
    workers_serving = {}
    for i in range(200):
        outcome = run_ok(client, shop, {"after": i})
        assert outcome.report.sha256 == candidate.deployment["sha256"] and outcome.report.rollout == ""
        workers_serving[outcome.worker.split("@")[0]] = outcome.report.version
        if len(workers_serving) == 2:
            break
    assert workers_serving == {"ro0a": 2, "ro0b": 2}
    assert [d.sha256 for d in deployer.history("test", shop)] == [live.sha256]


def test_a_candidate_differing_on_some_inputs_is_aborted_with_samples_beside_another_shop(
    client: Client, deployer: Registry
) -> None:
    """Shop A's candidate disagrees on inputs 5 and up, shop B's (same shard) never: A aborts with
    its disagreements kept, B is promoted, and neither rollout counts the other's calls. Every
    caller of A got the live output."""
    shop_a, shop_b = shop_on(0, SHARDS, skip=1), shop_on(0, SHARDS, skip=2)
    for shop in (shop_a, shop_b):
        deployer.deploy("test", shop, guests.digit_gate(10))
    rules = RolloutRules(promote_after=30, max_mismatch_rate=0.1)  # aborts past 3 mismatches
    deployer.start_rollout("test", shop_a, guests.digit_gate(5), rules)
    deployer.start_rollout("test", shop_b, guests.digit_gate(10), RolloutRules(promote_after=10))
    outputs = []
    for n in range(10):
        outputs.append(run_ok(client, shop_a, {"n": n}).output)
        run_ok(client, shop_b, {"n": n})
    assert outputs == [{"n": n} for n in range(10)]
    a = wait_for_state(deployer, shop_a, ABORTED)
    b = wait_for_state(deployer, shop_b, PROMOTED)
    # Two workers serve the shard, each judging its own calls, so which four of the five
    # disagreements are counted before the abort (and how many matches) varies.
    assert a.state == ABORTED and "4 mismatch(es) in" in a.reason, a
    assert a.counts["mismatch"] == 4 and a.counts["match"] <= 5
    inputs = [json.loads(s["input"])["n"] for s in a.samples]
    assert len(inputs) == 4 and set(inputs) <= {5, 6, 7, 8, 9}
    assert all(s["candidate"]["output"] == {"n": -1} and s["live"]["output"]["n"] >= 5 for s in a.samples)
    assert (b.state, b.counts["compared"], b.counts["mismatch"], b.samples) == (PROMOTED, 10, 0, [])
    time.sleep(INVALIDATION_S)
    assert run_ok(client, shop_a, {"n": 9}).output == {"n": 9}  # the live version stays


@pytest.mark.parametrize(
    ("candidate", "code"),
    [
        (guests.TRAP, "runtime_error"),
        (guests.INFINITE_LOOP, "instruction_limit_exceeded"),
        (guests.MEMORY_BOMB, "memory_limit_exceeded"),
    ],
    ids=["trap", "loop", "memory-bomb"],
)
def test_a_failing_or_hostile_candidate_is_aborted_and_harms_nothing(
    client: Client, deployer: Registry, candidate: bytes, code: str
) -> None:
    """A candidate that traps, loops or bombs memory gets its named error on its first shadow
    run and the rollout aborts; the caller got the live output, and the same worker serves the
    next call (and another shop's) at once."""
    shop, other = shop_on(1, SHARDS), shop_on(1, SHARDS, skip=1)
    deployer.deploy("test", shop, guests.ECHO)
    deployer.deploy("test", other, guests.ECHO)
    deployer.start_rollout("test", shop, candidate, RolloutRules(promote_after=50, max_mismatch_rate=0.5))
    first = run_ok(client, shop, {"first": 1})
    assert first.output == {"first": 1} and first.report.rollout == "shadowed"
    status = wait_for_state(deployer, shop, ABORTED)
    assert status.state == ABORTED and f"failed ({code})" in status.reason, status
    (sample,) = status.samples
    assert (sample["result"], sample["candidate"]["error_code"]) == ("candidate_error", code)
    after = run_ok(client, other, {"next": 1})
    assert after.output == {"next": 1} and after.worker == first.worker


def calls_during(
    client: Client, shop: str, during: Callable[[], None], threads: int = 3
) -> list[tuple[float, Outcome]]:
    """Calls from ``threads`` threads while ``during`` runs; each outcome with when it came back."""
    stop = threading.Event()
    seen: list[tuple[float, Outcome]] = []

    def call() -> None:
        n = 0
        while not stop.is_set():
            outcome = client.run("test", shop, {"n": n % 10}, timeout=5)
            seen.append((time.monotonic(), outcome))
            n += 1

    callers = [threading.Thread(target=call) for _ in range(threads)]
    for thread in callers:
        thread.start()
    try:
        during()
    finally:
        stop.set()
        for thread in callers:
            thread.join()
    return seen


def test_promotion_and_abort_are_atomic_under_concurrent_callers(client: Client, deployer: Registry) -> None:
    """While three threads call: a promotion by hand switches each call whole from the live
    version to the candidate (output and reported version agree), and once the invalidation time
    has passed no call gets the old one; an abort in the canary sends every call back to the
    live version the same way."""
    shop = shop_on(0, SHARDS, skip=3)
    live = deployer.deploy("test", shop, says({"v": 1}))
    new = deployer.start_rollout(
        "test", shop, says({"v": 2}), RolloutRules(promote_after=10_000, max_mismatch_rate=0.9)
    )
    marks: dict[str, float] = {}

    def promote() -> None:
        time.sleep(0.3)
        assert deployer.rollouts.decide("test", shop, PROMOTED, "by hand") == PROMOTED
        marks["promoted"] = time.monotonic()
        time.sleep(0.3)

    seen = calls_during(client, shop, promote)
    version_of = {live.sha256: {"v": 1}, new.deployment["sha256"]: {"v": 2}}
    assert all(o.ok and version_of[o.report.sha256] == o.output for _, o in seen)
    assert any(o.output == {"v": 1} for _, o in seen) and any(o.output == {"v": 2} for _, o in seen)
    assert all(o.output == {"v": 2} for at, o in seen if at > marks["promoted"] + INVALIDATION_S)

    # Abort in the canary: the candidate agrees (its module differs, its output does not), serves
    # every call once shadowing passes, and the abort returns every call to the live version.
    live = deployer.deploy("test", shop, guests.ECHO)
    rules = RolloutRules(promote_after=5, canary_percent=100, canary_calls=1_000_000)
    new = deployer.start_rollout("test", shop, guests.echo(burn=10), rules)

    def abort() -> None:
        assert wait_for_state(deployer, shop, CANARY).state == CANARY
        time.sleep(0.3)
        assert deployer.rollouts.decide("test", shop, ABORTED, "by hand") == ABORTED
        marks["aborted"] = time.monotonic()
        time.sleep(0.3)

    seen = calls_during(client, shop, abort)
    served_as = {live.sha256: {"shadowed", "control", ""}, new.deployment["sha256"]: {"canary"}}
    assert all(o.ok and o.output == {"n": o_n} for o_n, o in _with_inputs(seen))
    assert all(o.report.rollout in served_as[o.report.sha256] for _, o in seen)
    assert any(o.report.rollout == "canary" for _, o in seen)
    after = [o for at, o in seen if at > marks["aborted"] + INVALIDATION_S]
    assert after and all(o.report.sha256 == live.sha256 and o.report.rollout == "" for o in after)


def _with_inputs(seen: list[tuple[float, Outcome]]) -> Iterator[tuple[int, Outcome]]:
    for _, outcome in seen:
        yield outcome.output["n"], outcome


def test_slow_and_looping_candidates_cost_capacity_not_caller_latency(
    client: Client, deployer: Registry
) -> None:
    """Live latency on one shard (serial calls, medians) with no rollout; with a correct but slow
    candidate (about 20 ms a run) shadowing every call (R = 1.0); and while a looping candidate
    burns its whole budget (about 700 ms) in the shadow thread. Had shadow runs been on the
    caller's path, each call would have taken a candidate run longer; they cost the worker's
    spare capacity, and runs it cannot keep up with are dropped, not queued."""
    shop, probe = shop_on(1, SHARDS, skip=2), shop_on(1, SHARDS, skip=3)
    slow = guests.echo(burn=25_000_000)
    deployer.deploy("heavy", probe, slow)
    candidate_ms = statistics.median(
        client.run("heavy", probe, {}, timeout=5).timings.execute_ms for _ in range(5)
    )
    deployer.deploy("heavy", shop, guests.ECHO)

    def latencies(calls: int) -> list[float]:
        elapsed = []
        for i in range(calls):
            started = time.perf_counter()
            outcome = client.run("heavy", shop, {"i": i}, timeout=5)
            elapsed.append((time.perf_counter() - started) * 1000)
            assert outcome.ok and outcome.output == {"i": i}, outcome.error
        return elapsed

    latencies(10)  # warm
    without = statistics.median(latencies(150))
    deployer.start_rollout("heavy", shop, slow, RolloutRules(promote_after=1_000_000))
    shadowed = statistics.median(latencies(150))
    # Shadow runs take idle CPU: while the calls come, few are judged; the queued ones are
    # judged once the calls stop.
    deadline = time.monotonic() + 10
    while (status := deployer.rollouts.status("heavy", shop)).counts["compared"] < 20:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    deployer.rollouts.decide("heavy", shop, ABORTED, "measured")
    assert status.state == SHADOWING, status

    deployer.start_rollout("heavy", shop, guests.INFINITE_LOOP, RolloutRules())
    latencies(1)  # its shadow run starts now and loops to the fuel limit
    during_loop = latencies(40)
    looped = wait_for_state(deployer, shop, ABORTED, ep="heavy", call=lambda: latencies(1))
    # Its fuel (about 700 ms of CPU) or, on a machine too busy to give it that within its 2 s, its
    # wall clock: only a run that used the CPU for at least half its wall time counts as that.
    assert looped.state == ABORTED, looped
    assert "instruction_limit_exceeded" in looped.reason or "wall_clock_exceeded" in looped.reason, looped

    assert candidate_ms > 10, candidate_ms
    assert shadowed < without + candidate_ms / 3, (without, shadowed, candidate_ms)
    assert statistics.median(during_loop) < without + candidate_ms / 3, (without, during_loop)
    assert max(during_loop) < 150, during_loop  # the loop runs about 700 ms


def test_a_worker_killed_mid_shadow_loses_no_reply_and_corrupts_no_count(
    pool_settings: Settings, deployer: Registry, workers: dict[str, WorkerProcess]
) -> None:
    """A third worker on shard 0 is SIGKILLed 10 ms into a shadow run of a slow candidate (about
    80 ms): the call it had answered was answered, every later call is served by the other two,
    the counts still add up (compared = match + mismatch + candidate error, never more than the
    calls made) and the rollout goes on to promotion."""
    shop = shop_on(0, SHARDS, skip=4)
    deployer.deploy("heavy", shop, guests.ECHO)
    deployer.start_rollout("heavy", shop, guests.echo(burn=100_000_000), RolloutRules(promote_after=20))
    victim = start_workers(pool_settings, {"ro0kill": [0]})[0]
    made = 0
    try:
        with Client(pool_settings) as client:

            def call() -> Outcome:
                nonlocal made
                made += 1
                outcome = client.run("heavy", shop, {"n": made}, timeout=5)
                assert outcome.ok and outcome.output == {"n": made}, outcome.error
                return outcome

            while not call().worker.startswith("ro0kill@"):
                pass
            time.sleep(0.01)
            victim.kill()
            deadline = time.monotonic() + JUDGING_S
            while deployer.rollouts.status("heavy", shop).state != PROMOTED and time.monotonic() < deadline:
                assert not call().worker.startswith("ro0kill@")
    finally:
        victim.kill()
    status = deployer.rollouts.status("heavy", shop)
    counts = status.counts
    assert status.state == PROMOTED, status
    assert counts["compared"] == counts["match"] + counts["mismatch"] + counts["candidate_error"] >= 20
    assert counts["compared"] < made


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def test_the_shadow_process_starts_with_the_first_rollout_call_and_ends_with_its_worker(
    pool_settings: Settings, deployer: Registry, workers: dict[str, WorkerProcess]
) -> None:
    """A worker has no shadow process until a call of a rollout reaches it; it has one, at idle
    priority, after; and when the worker is SIGKILLed (alone, not its process group) the shadow
    process sees its socket close and exits."""
    shop = shop_on(1, SHARDS, skip=6)
    deployer.deploy("test", shop, guests.ECHO)
    worker = start_workers(pool_settings, {"ro1solo": [1]})[0]
    try:
        with Client(pool_settings) as client:
            while not run_ok(client, shop, {}).worker.startswith("ro1solo@"):
                pass
            assert _children(worker.process.pid) == []
            deployer.start_rollout("test", shop, guests.echo(burn=10), RolloutRules(promote_after=1_000))
            time.sleep(INVALIDATION_S)
            while not run_ok(client, shop, {}).worker.startswith("ro1solo@"):
                pass
            deadline = time.monotonic() + 10
            while not (shadow := _children(worker.process.pid)):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            (pid,) = shadow
            while os.sched_getscheduler(pid) != os.SCHED_IDLE:  # its first step
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(worker.process.pid, signal.SIGKILL)
            worker.process.wait(timeout=10)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
                assert time.monotonic() < deadline, "the shadow process outlived its worker"
                time.sleep(0.05)
    finally:
        worker.kill()
        deployer.rollouts.decide("test", shop, ABORTED, "test over")
