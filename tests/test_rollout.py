"""Verified rollouts: a candidate runs beside the live version on shadow runs, and is promoted or
aborted by its rules, atomically; in process first, then through real workers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from scriptpool.config.errors import RolloutConflict, ScriptNotFound
from scriptpool.registry import ABORTED, CANARY, PROMOTED, SHADOWING, Registry, RolloutRules
from scriptpool.runtime import Executor, Sample, ShadowJudge, _judge, compare
from tests import guests

SHARDS = 2


def echo_plus(extra: str) -> bytes:
    """A script printing its input with one more key: the same output for every input when
    ``extra`` is the same, a different one when it is not."""
    return guests.writes(json.dumps({"by": extra}).encode())


@pytest.fixture
def judge(registry: Registry, executor: Executor) -> ShadowJudge:
    return ShadowJudge(executor, registry.rollouts)


def call(executor: Executor, judge: ShadowJudge, shop: str, payload: Any, ep: str = "test") -> Any:
    """One live call, then its judgement, as a worker and its shadow process do them."""
    wire = json.dumps(payload, separators=(",", ":")).encode()  # bytes, as a job carries them
    execution = executor.execute(ep, shop, wire)
    judge.judge(Sample(ep, shop, wire, execution))
    judge.flush()
    return execution


def test_comparison_is_canonical_and_counts_codes() -> None:
    """Key order does not matter; same error code is a match; a candidate failing where the live
    version did not is its own result; any other difference is a mismatch."""
    from scriptpool.config.wire import ErrorInfo, Execution, ExecutionReport

    def ok(output: Any) -> Execution:
        return Execution(True, output, None, ExecutionReport())

    def failed(code: str) -> Execution:
        return Execution(False, None, ErrorInfo(code, "x"), ExecutionReport())

    assert compare(ok({"a": 1, "b": [2]}), ok({"b": [2], "a": 1})) == ("match", "")
    assert compare(ok({"a": 1}), ok({"a": 2})) == ("mismatch", "")
    assert compare(ok({"a": 1}), failed("runtime_error")) == ("candidate_error", "runtime_error")
    assert compare(failed("runtime_error"), failed("runtime_error")) == ("match", "")
    assert compare(failed("runtime_error"), failed("invalid_output")) == ("mismatch", "")
    assert compare(failed("runtime_error"), ok({})) == ("mismatch", "")


def test_an_identical_candidate_is_promoted_after_n_with_history(
    registry: Registry, executor: Executor, judge: ShadowJudge
) -> None:
    """Callers get the live version while the candidate shadows; after N matching comparisons
    the candidate is the live binding (version 2), with the old one in history for rollback."""
    live = registry.deploy("test", "s", echo_plus("x"))
    same_output = guests.writes(json.dumps({"by": "x"}).encode(), stderr=b"the candidate logs")
    candidate = registry.start_rollout("test", "s", same_output, RolloutRules(promote_after=5))
    with pytest.raises(RolloutConflict):
        registry.start_rollout("test", "s", same_output, RolloutRules())
    for n in range(4):
        execution = call(executor, judge, "s", {"n": n})
        assert execution.report.sha256 == live.sha256 and execution.report.rollout == "shadowed"
    assert registry.rollouts.status("test", "s").state == SHADOWING
    call(executor, judge, "s", {"n": 4})
    status = registry.rollouts.status("test", "s")
    assert (status.state, status.counts["compared"], status.counts["match"]) == (PROMOTED, 5, 5)
    promoted = registry.binding("test", "s")
    assert (promoted.version, promoted.sha256) == (2, candidate.deployment["sha256"])
    assert [d.sha256 for d in registry.history("test", "s")] == [live.sha256]
    executor.invalidate("test", "s")  # a worker hears it on the channel
    after = executor.execute("test", "s", {})
    assert after.report.sha256 == promoted.sha256 and after.report.rollout == ""
    assert registry.rollback("test", "s").sha256 == live.sha256


def test_a_candidate_that_differs_on_some_inputs_is_aborted_with_samples(
    registry: Registry, executor: Executor, judge: ShadowJudge
) -> None:
    """The candidate agrees on small inputs and not on others: the first disagreement aborts it
    (max mismatch rate 0), callers only ever got the live output, and the sample keeps the
    input and both outputs."""
    registry.deploy("test", "s", guests.digit_gate(10))  # live: always echoes
    registry.start_rollout("test", "s", guests.digit_gate(5), RolloutRules(promote_after=50))
    outputs = [call(executor, judge, "s", {"n": n}).output for n in range(8)]
    assert outputs == [{"n": n} for n in range(8)]
    status = registry.rollouts.status("test", "s")
    assert status.state == ABORTED and "1 mismatch(es) in 6 compared runs" in status.reason
    (sample,) = status.samples
    assert json.loads(sample["input"]) == {"n": 5}
    assert sample["live"]["output"] == {"n": 5} and sample["candidate"]["output"] == {"n": -1}
    executor.invalidate("test", "s")
    assert executor.execute("test", "s", {"n": 7}).report.rollout == ""  # the live version stays


def test_a_failing_candidate_is_aborted_at_once(
    registry: Registry, executor: Executor, judge: ShadowJudge
) -> None:
    """A candidate that traps where the live version succeeds is aborted on the first run, even
    with a mismatch rate allowed."""
    registry.deploy("test", "s", echo_plus("x"))
    registry.start_rollout("test", "s", guests.TRAP, RolloutRules(promote_after=50, max_mismatch_rate=0.5))
    assert call(executor, judge, "s", {}).output == {"by": "x"}
    status = registry.rollouts.status("test", "s")
    assert status.state == ABORTED and "failed (runtime_error)" in status.reason
    assert status.counts["candidate_error"] == 1


@pytest.mark.parametrize(("cpu_share", "counted"), [(0.1, False), (0.9, True)])
def test_a_shadow_run_past_its_wall_clock_counts_only_if_it_used_the_cpu(
    registry: Registry,
    executor: Executor,
    judge: ShadowJudge,
    monkeypatch: pytest.MonkeyPatch,
    cpu_share: float,
    counted: bool,
) -> None:
    """Shadow runs take idle CPU only: on a busy machine a candidate can pass its wall clock
    while barely running. Such a run (on the CPU for under half its wall time) is not judged;
    one that used the CPU all along is a candidate error, as on an idle machine."""
    registry.define_extension_point("walled", limits={"fuel": 10**12, "wall_ms": 20})
    registry.deploy("walled", "s", echo_plus("x"))
    registry.start_rollout("walled", "s", guests.INFINITE_LOOP, RolloutRules(promote_after=5))
    clock = iter([0.0, cpu_share * 0.02])  # the thread's CPU seconds before and after the shadow run
    monkeypatch.setattr(_judge.time, "thread_time", lambda: next(clock))
    call(executor, judge, "s", {}, ep="walled")
    status = registry.rollouts.status("walled", "s")
    if counted:
        assert status.state == ABORTED and "failed (wall_clock_exceeded)" in status.reason
    else:
        assert status.state == SHADOWING and status.counts["compared"] == 0, status


def test_the_canary_serves_a_fixed_share_by_input(
    registry: Registry, executor: Executor, judge: ShadowJudge
) -> None:
    """After shadowing passes, P% of inputs (the same inputs every time: a retry gets the same
    version) are served by the candidate; after K canary calls it is promoted."""
    registry.deploy("test", "s", guests.digit_gate(10))
    rules = RolloutRules(promote_after=3, canary_percent=50, canary_calls=12)
    registry.start_rollout("test", "s", guests.digit_gate(10), rules)
    for n in range(3):
        call(executor, judge, "s", {"n": n})
    assert registry.rollouts.status("test", "s").state == CANARY
    executor.invalidate("test", "s")
    inputs = [{"n": n, "cart": i} for n in range(10) for i in range(10)]  # 100 distinct inputs
    served = [executor.execute("test", "s", payload).report.rollout for payload in inputs]
    assert 25 <= served.count("canary") <= 75 and set(served) == {"canary", "control"}
    assert served == [executor.execute("test", "s", payload).report.rollout for payload in inputs]
    for payload in inputs:
        call(executor, judge, "s", payload)
        if registry.rollouts.status("test", "s").state == PROMOTED:
            break
    status = registry.rollouts.status("test", "s")
    assert status.state == PROMOTED and status.counts["canary_calls"] == 12


def test_a_canary_that_errors_more_than_live_is_aborted_and_traffic_returns(
    registry: Registry, executor: Executor, judge: ShadowJudge
) -> None:
    """A candidate that agrees while shadowing (inputs 0-2) but fails on inputs 5 and up serves
    the canary until its error rate exceeds the live one's by the threshold: then the rollout
    aborts and every call is the live version's again."""
    registry.deploy("test", "s", guests.digit_gate(10))
    rules = RolloutRules(promote_after=3, canary_percent=100, canary_calls=1000, max_error_increase=0.2)
    registry.start_rollout("test", "s", guests.digit_gate(5, fail=True), rules)
    for n in range(3):
        call(executor, judge, "s", {"n": n})
    assert registry.rollouts.status("test", "s").state == CANARY
    executor.invalidate("test", "s")
    outcomes = []
    for _ in range(3):
        for n in range(10):
            outcomes.append(call(executor, judge, "s", {"n": n}))
            if registry.rollouts.status("test", "s").state == ABORTED:
                break
    status = registry.rollouts.status("test", "s")
    assert status.state == ABORTED and "canary error rate" in status.reason
    assert any(o.report.rollout == "canary" and not o.ok for o in outcomes)
    executor.invalidate("test", "s")
    after = [executor.execute("test", "s", {"n": n}) for n in range(10)]
    assert all(o.ok and o.report.rollout == "" for o in after)


def test_rollouts_by_hand_and_without_a_live_version(registry: Registry, executor: Executor) -> None:
    """``promote`` and ``abort`` end a rollout at once; a rollout needs a live script to replace."""
    with pytest.raises(ScriptNotFound):
        registry.start_rollout("test", "nobody", echo_plus("x"), RolloutRules())
    registry.deploy("test", "s", echo_plus("x"))
    registry.start_rollout("test", "s", echo_plus("y"), RolloutRules())
    assert [(r.ep, r.shop, r.state) for r in registry.rollouts.under_way()] == [("test", "s", SHADOWING)]
    assert registry.rollouts.decide("test", "s", PROMOTED, "by hand") == PROMOTED
    assert registry.rollouts.under_way() == []
    assert executor.execute("test", "s", {}).output == {"by": "y"}
    registry.start_rollout("test", "s", echo_plus("z"), RolloutRules())
    assert registry.rollouts.decide("test", "s", ABORTED, "by hand") == ABORTED
    executor.invalidate("test", "s")
    assert executor.execute("test", "s", {}).output == {"by": "y"}
    with pytest.raises(ScriptNotFound):
        registry.rollouts.decide("test", "s", ABORTED, "nothing left")


def test_a_deploy_rollback_or_undeploy_of_the_live_version_ends_the_rollout(
    registry: Registry, executor: Executor
) -> None:
    """The candidate was judged against the live version: when that changes by hand, the
    rollout is aborted in the same step, with the reason, and the new binding is what runs."""
    registry.deploy("test", "s", echo_plus("x"))
    registry.start_rollout("test", "s", echo_plus("y"), RolloutRules())
    registry.deploy("test", "s", echo_plus("z"))
    status = registry.rollouts.status("test", "s")
    assert status.state == ABORTED and status.reason == "superseded by a deploy of the live version"
    assert registry.bindings("test", "s").candidate is None
    assert executor.execute("test", "s", {}).output == {"by": "z"}
    registry.start_rollout("test", "s", echo_plus("y"), RolloutRules())
    registry.rollback("test", "s")
    assert registry.rollouts.status("test", "s").reason == "superseded by a rollback of the live version"
    registry.start_rollout("test", "s", echo_plus("y"), RolloutRules())
    registry.undeploy("test", "s")
    assert registry.rollouts.status("test", "s").reason == "superseded by an undeploy of the live version"
    assert registry.rollouts.under_way() == []
    with pytest.raises(ScriptNotFound):
        registry.bindings("test", "s")


def test_a_rollout_replaces_one_app_of_a_join(
    registry: Registry, executor: Executor, judge: ShadowJudge
) -> None:
    """In a join, the candidate takes its app's place in the shadow run and the other apps run as
    they are: the whole call's output is what is compared, and promotion binds that app alone."""
    from tests.test_apps import discounts

    registry.define_extension_point("joined", combine="join", reducer="concat:discounts")
    registry.deploy("joined", "s", discounts("a", 1), app="a")
    registry.deploy("joined", "s", discounts("b", 2), app="b")
    registry.start_rollout("joined", "s", discounts("b", 3), RolloutRules(promote_after=5), app="b")
    live = call(executor, judge, "s", {}, ep="joined")
    assert [d["value"] for d in live.output["discounts"]] == [1, 2]
    status = registry.rollouts.status("joined", "s")
    assert status.state == ABORTED and status.app == "b"
    (sample,) = status.samples
    assert [d["value"] for d in sample["candidate"]["output"]["discounts"]] == [1, 3]
    registry.start_rollout("joined", "s", discounts("b", 2), RolloutRules(promote_after=2), app="b")
    executor.invalidate("joined", "s")  # a worker hears it on the channel
    for _ in range(2):
        call(executor, judge, "s", {}, ep="joined")
    assert registry.rollouts.status("joined", "s").state == PROMOTED
    assert (
        registry.binding("joined", "s", app="a").version,
        registry.binding("joined", "s", app="b").version,
    ) == (1, 2)


def test_the_readme_example_candidates(registry: Registry, executor: Executor, judge: ShadowJudge) -> None:
    """examples/rollout: the discount script built for size agrees with the live build and is
    promoted; the off-by-one build disagrees on the example cart (its quantity-2 line) and is
    aborted, with the sample showing the lost target."""
    from tests.conftest import EXAMPLES

    cart = json.loads((EXAMPLES / "discount" / "input.json").read_text())
    registry.deploy("test", "s", (EXAMPLES / "discount" / "discount.wasm").read_bytes())
    v2 = (EXAMPLES / "rollout" / "discount_v2.wasm").read_bytes()
    assert v2 != (EXAMPLES / "discount" / "discount.wasm").read_bytes()
    registry.start_rollout("test", "s", v2, RolloutRules(promote_after=3))
    for _ in range(3):
        call(executor, judge, "s", cart)
    assert registry.rollouts.status("test", "s").state == PROMOTED
    bad = (EXAMPLES / "rollout" / "discount_off_by_one.wasm").read_bytes()
    registry.start_rollout("test", "s", bad, RolloutRules(promote_after=3))
    executor.invalidate("test", "s")
    live = call(executor, judge, "s", cart)
    status = registry.rollouts.status("test", "s")
    assert status.state == ABORTED
    (sample,) = status.samples
    assert sample["live"]["output"] == live.output
    targets = [t["cartLine"]["id"] for t in sample["candidate"]["output"]["discounts"][0]["targets"]]
    assert targets == ["gid://shopify/CartLine/1"]  # line 3 (quantity 2 = the minimum) was lost


def test_status_points_at_the_first_difference() -> None:
    """``rollout status`` shows where a disagreement's outputs first differ, and a missing side."""
    from scriptpool.cli._rollout_commands import _short, first_difference

    path, live, candidate = first_difference(
        {"d": [{"t": 1}, {"t": 3}], "s": "F"}, {"d": [{"t": 1}], "s": "F"}
    )
    assert (path, live, _short(candidate)) == ("d[1]", {"t": 3}, "(missing)")
    assert first_difference({"a": {"b": 1, "c": 2}}, {"a": {"c": 2, "b": True}})[0] == "a.b"


def test_a_shadow_process_that_stops_reading_never_blocks_the_worker(settings: Any) -> None:
    """The worker's hand-over is one send that never waits: with the shadow process frozen
    (SIGSTOP), the samples fill the buffer (8 MiB: the kernel doubles the 4 asked for) and every
    later one is dropped and counted at once; thawed, it carries on."""
    import os
    import signal
    import time

    from scriptpool.config.wire import Execution, ExecutionReport
    from scriptpool.workers._shadow import _RESULTS, ShadowRunner

    live = Execution(True, {"x": 1}, None, ExecutionReport(rollout="shadowed", rollout_id="r"))
    runner = ShadowRunner(settings)
    try:
        runner.offer("test", "s", b"{}", live)  # starts the shadow process
        process = runner._process
        assert process is not None
        os.kill(process.pid, signal.SIGSTOP)
        dropped_before = _RESULTS["dropped"]._value.get()
        slowest = 0.0
        for _ in range(400):  # 400 x 64 KiB: three times the buffer
            started = time.perf_counter()
            runner.offer("test", "s", b"x" * 65536, live)
            slowest = max(slowest, time.perf_counter() - started)
        assert _RESULTS["dropped"]._value.get() - dropped_before >= 200
        assert slowest < 0.05, slowest
        os.kill(process.pid, signal.SIGCONT)
        assert process.poll() is None
    finally:
        runner.stop()


def test_the_worker_takes_what_the_shadow_process_sends_as_data(settings: Any) -> None:
    """The shadow process runs untrusted code, so the worker unpickles nothing from it: a
    message that is not MessagePack of the expected shape (pickle included) is refused and
    logged, unknown counts and negative ones are ignored, a log record cannot overwrite the
    worker's record attributes, and the reader takes the next message all the same."""
    import pickle
    import socket
    import subprocess
    import sys

    import msgpack

    from scriptpool.workers._shadow import _RESULTS, ShadowRunner
    from tests.logs import captured_events

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    matches, mismatches = _RESULTS["match"]._value.get(), _RESULTS["mismatch"]._value.get()
    for message in (
        b"\x00 not msgpack",
        pickle.dumps(("counts", {"match": 100})),
        msgpack.packb(["counts"]),
        msgpack.packb(("counts", {"match": 2, "no such result": 5, "mismatch": -3})),
        msgpack.packb(("log", (30, "scriptpool.worker", "from_shadow", {"msg": "overwrite", "k": 1}))),
        msgpack.packb(("counts", {"match": 1})),
    ):
        theirs.send(message)
    theirs.close()
    with captured_events() as events:
        ShadowRunner(settings)._read(ours, process)  # until the other end is closed
    assert _RESULTS["match"]._value.get() - matches == 3
    assert _RESULTS["mismatch"]._value.get() == mismatches
    assert [e["event"] for e in events].count("shadow_message_refused") == 3
    forwarded = [e for e in events if e["event"] == "from_shadow"]
    assert len(forwarded) == 1 and forwarded[0]["k"] == 1
