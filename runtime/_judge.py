"""Judging the calls of a rollout: run the candidate on a call's input, compare the two
outcomes, and report to the registry, which counts and promotes or aborts by the rollout's rules
(``scriptpool.registry._rollouts``). Runs in the shadow process (``scriptpool.workers._shadow``),
never on a caller's path.

Reports are batched: what a judge sees of a rollout is tallied and sent in one Redis step when
the tally is ``BATCH`` long, when the shadow process is idle or about every ``FLUSH_S``; a
disagreement or a failure is sent at once, so a rollout aborts on the run that decides it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from scriptpool.config import get_logger
from scriptpool.config.errors import WallClockExceeded
from scriptpool.config.wire import Execution
from scriptpool.registry import CANARY, CANDIDATE_ERROR, MATCH, MISMATCH, Candidate, Rollouts, Tally
from scriptpool.runtime._executor import CONTROL, Executor

log = get_logger("worker")

BATCH = 64


@dataclass(frozen=True, slots=True)
class Sample:
    """One call just answered during a rollout: where, its input as the job carried it, and the
    outcome the caller got."""

    ep: str
    shop: str
    payload: bytes
    live: Execution
    # The call's session token: the candidate reads the same session's data as the live script.
    session: str | None = None
    # The trace context of the live job's span when the worker traces it (README "Traces"): the
    # shadow run's span links to it.
    trace: dict[str, str] | None = None

    def pack(self) -> bytes:
        """The sample as one MessagePack message (the reply's own wire form of the outcome)."""
        wire: tuple[Any, ...] = (self.ep, self.shop, self.payload, self.live.to_wire())
        if self.session is not None or self.trace is not None:
            wire += (self.session,)
        if self.trace is not None:
            wire += (self.trace,)
        return bytes(msgpack.packb(wire, use_bin_type=True))

    @classmethod
    def unpack(cls, message: bytes) -> Sample:
        ep, shop, payload, live, *rest = msgpack.unpackb(message, raw=False)
        session = rest[0] if rest and type(rest[0]) is str else None
        trace = rest[1] if len(rest) > 1 and type(rest[1]) is dict else None
        return cls(ep, shop, payload, Execution.from_wire(live), session, trace)


def compare(live: Execution, candidate: Execution) -> tuple[str, str]:
    """What a shadow run found, and the candidate's error code when that is what it found.

    Both succeeded with the same output (canonical JSON: key order does not matter, ``1`` and
    ``true`` do), or both failed with the same code: a match. The candidate failed where the live
    version did not: a candidate error. Anything else (different outputs or codes, or the
    candidate succeeding where the live version failed): a mismatch.
    """
    if live.ok and candidate.ok:
        return (MATCH, "") if _canonical(live.output) == _canonical(candidate.output) else (MISMATCH, "")
    if live.ok:
        return CANDIDATE_ERROR, candidate.error.code if candidate.error else ""
    if not candidate.ok and live.error and candidate.error and live.error.code == candidate.error.code:
        return MATCH, ""
    return MISMATCH, ""


# Shadow runs take only idle CPU (the shadow process's priority), so on a busy machine a correct
# candidate can run past its wall-clock limit without using it: a shadow run that hit the wall
# clock while on the CPU for less than this share of it proves nothing about the candidate, and is
# not counted. One that used the CPU all along is a candidate error, as on an idle machine.
STARVED_CPU_SHARE = 0.5


def _starved(shadow: Execution, cpu_s: float) -> bool:
    """Whether ``shadow`` ran past its wall clock for want of CPU rather than by its own work."""
    if shadow.ok or shadow.error is None or shadow.error.code != WallClockExceeded.code:
        return False
    wall_s = (shadow.report.instantiate_ms + shadow.report.run_ms) / 1000
    return cpu_s < STARVED_CPU_SHARE * wall_s


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class ShadowJudge:
    """Runs the candidates of this process's executor and reports to ``rollouts``."""

    def __init__(self, executor: Executor, rollouts: Rollouts) -> None:
        self._executor = executor
        self._rollouts = rollouts
        self._pending: dict[tuple[str, str], tuple[Candidate, Tally]] = {}
        self._ended: set[str] = set()  # rollouts found over

    def judge(self, sample: Sample) -> str | None:
        """Deal with one call a worker handed over: in the canary, count it for the version that
        served it; while shadowing, run the candidate on it and compare. The comparison's
        result, if there was one."""
        live = sample.live
        if live.report.rollout_id in self._ended:
            return None
        candidate = self._executor.candidate(sample.ep, sample.shop, live.report.rollout_id)
        if candidate is None:  # the rollout is over: its calls still queued need no more reads
            if len(self._ended) > 10_000:
                self._ended.clear()
            self._ended.add(live.report.rollout_id)
            return None
        tally = self._tally(sample, candidate)
        served = live.report.rollout
        result = None
        if served == CANARY:
            tally.canary_calls += 1
            tally.canary_errors += not live.ok
            urgent = not live.ok
        elif served == CONTROL:
            tally.live_calls += 1
            tally.live_errors += not live.ok
            urgent = False
        else:
            result = self._shadow_run(sample, candidate, tally)
            urgent = result not in (MATCH, None)
        if urgent or len(tally) >= BATCH:
            self._report((sample.ep, sample.shop))
        return result

    @property
    def pending(self) -> bool:
        """Whether something is tallied and not yet reported."""
        return bool(self._pending)

    def flush(self) -> None:
        """Report every tally not yet reported."""
        for key in list(self._pending):
            self._report(key)

    def _shadow_run(self, sample: Sample, candidate: Candidate, tally: Tally) -> str | None:
        cpu_started = time.thread_time()
        found = self._executor.run_candidate(
            sample.ep, sample.shop, sample.payload, candidate.id, session=sample.session
        )
        if found is None:  # the rollout changed meanwhile
            return None
        shadow = found[1]
        if _starved(shadow, time.thread_time() - cpu_started):
            return None  # the wall clock measured the machine's load, not the candidate
        result, code = compare(sample.live, shadow)
        if result == MATCH:
            tally.match += 1
        elif result == MISMATCH:
            tally.mismatch += 1
        else:
            tally.candidate_error += 1
            tally.error_code = tally.error_code or code
        tally.instructions_delta += shadow.report.instructions - sample.live.report.instructions
        tally.peak_memory_delta += shadow.report.peak_memory_bytes - sample.live.report.peak_memory_bytes
        if result != MATCH:
            tally.samples.append(_disagreement(sample, shadow, result))
        return result

    def _tally(self, sample: Sample, candidate: Candidate) -> Tally:
        key = (sample.ep, sample.shop)
        pending = self._pending.get(key)
        if pending is not None and pending[0].id != candidate.id:
            self._report(key)
            pending = None
        if pending is None:
            pending = self._pending[key] = (candidate, Tally())
        return pending[1]

    def _report(self, key: tuple[str, str]) -> None:
        candidate, tally = self._pending.pop(key)
        if not len(tally):
            return
        decided = self._rollouts.report(*key, candidate, tally)
        if decided in ("canary", "promoted", "aborted"):
            status = self._rollouts.status(*key)
            log.info(
                f"rollout_{decided}",
                ep=key[0],
                shop=key[1],
                app=candidate.app,
                rollout=candidate.id,
                reason=status.reason,
                compared=status.counts.get("compared", 0),
            )


def _disagreement(sample: Sample, shadow: Execution, result: str) -> dict[str, Any]:
    def side(execution: Execution) -> dict[str, Any]:
        return {
            "status": execution.status,
            "error_code": execution.error.code if execution.error else None,
            "output": execution.output,
            "instructions": execution.report.instructions,
        }

    return {
        "at": time.time(),
        "result": result,
        "input": sample.payload.decode("utf-8", errors="replace"),
        "live": side(sample.live),
        "candidate": side(shadow),
    }
