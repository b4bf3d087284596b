"""Bounded load from real host clients: threads calling ``Client.run``, every call recorded."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scriptpool.producer import Client

FALLBACK = {"fallback": True}


@dataclass(frozen=True)
class Planned:
    """One call to make: which script, on what input, and the output a correct run gives
    (``None`` when the call is expected to fail)."""

    ep: str
    shop: str
    input: Any
    expected: Any = None
    error_code: str | None = None


@dataclass(frozen=True)
class Call:
    """What one caller saw."""

    index: int
    started: float
    finished: float
    timeout_s: float
    status: str
    error_code: str | None
    output: Any
    worker: str | None
    job_id: str | None
    sha256: str = ""  # the module version that served it

    @property
    def elapsed_ms(self) -> float:
        return (self.finished - self.started) * 1000

    @property
    def late_ms(self) -> float:
        """How far past its deadline this caller was answered (negative: before it)."""
        return self.elapsed_ms - self.timeout_s * 1000


class Load:
    """Runs ``plan`` from ``threads`` threads in the background while a test injects faults.

    With ``rate`` the load is open-loop, as checkout traffic is: call ``i`` starts no earlier
    than ``i / rate`` seconds in, however fast earlier calls were answered (a fallback is
    instant, and would otherwise burn through the plan while the fault lasts).
    """

    def __init__(
        self,
        client: Client,
        plan: Sequence[Planned],
        *,
        threads: int,
        timeout_s: float,
        rate: float | None = None,
    ) -> None:
        self.client = client
        self.rate = rate
        self.plan = plan
        self.timeout_s = timeout_s
        self.calls: list[Call | None] = [None] * len(plan)
        self._next = itertools.count()
        self._done = itertools.count(1)
        self.done = 0
        self.began = 0.0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]

    def start(self) -> Load:
        self.began = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def _work(self) -> None:
        while not self._stop.is_set() and (index := next(self._next)) < len(self.plan):
            planned = self.plan[index]
            if self.rate is not None:
                self._stop.wait(self.began + index / self.rate - time.monotonic())
            started = time.monotonic()
            outcome = self.client.run(
                planned.ep, planned.shop, planned.input, timeout=self.timeout_s, fallback=FALLBACK
            )
            finished = time.monotonic()
            self.calls[index] = Call(
                index, started, finished, self.timeout_s, outcome.status, outcome.error_code,
                outcome.output, outcome.worker, outcome.job_id,
                outcome.report.sha256 if outcome.report else "",
            )  # fmt: skip
            self.done = next(self._done)

    def wait_for(self, done: int, timeout_s: float = 60.0) -> None:
        """Block until ``done`` calls have finished."""
        deadline = time.monotonic() + timeout_s
        while self.done < done:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.done} of {done} calls finished in {timeout_s} s")
            time.sleep(0.005)

    def stop(self) -> None:
        """Start no more calls; the ones in flight finish."""
        self._stop.set()

    def join(self, timeout_s: float = 120.0) -> list[Call]:
        """Wait for every caller; a caller still blocked after ``timeout_s`` is a hang.

        Returns the calls made, in plan order (all of the plan unless :meth:`stop` was called).
        """
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = sum(thread.is_alive() for thread in self._threads)
        assert hung == 0, f"{hung} caller threads still blocked after {timeout_s} s"
        made = len(self.plan) if not self._stop.is_set() else min(next(self._next), len(self.plan))
        missing = [i for i, call in enumerate(self.calls[:made]) if call is None]
        assert not missing, f"{len(missing)} calls never returned, e.g. #{missing[:5]}"
        return [call for call in self.calls[:made] if call is not None]


def wrong_results(plan: Sequence[Planned], calls: Sequence[Call]) -> list[Call]:
    """Calls that answered ``ok`` with something other than the correct output, or an error
    other than the planned one. A fallback is never wrong."""
    wrong = []
    for call in calls:
        planned = plan[call.index]
        wrong_output = call.status == "ok" and call.output != planned.expected
        wrong_error = call.status == "error" and call.error_code != planned.error_code
        wrong_fallback = call.status != "ok" and call.output != FALLBACK
        if wrong_output or wrong_error or wrong_fallback:
            wrong.append(call)
    return wrong


def recovery_s(calls: Sequence[Call], cleared_at: float, *, window_s: float = 0.5) -> float:
    """Seconds from ``cleared_at`` until a ``window_s`` window of finished calls is at least half
    as ``ok``-dense as the load before the fault, i.e. until throughput has returned."""
    oks = sorted(c.finished for c in calls if c.status == "ok")
    before = [t for t in oks if t < cleared_at]
    if len(before) < 2:
        raise AssertionError("no baseline: too few ok calls before the fault")
    baseline_rate = len(before) / (before[-1] - min(c.started for c in calls))
    needed = max(1, int(baseline_rate * window_s * 0.5))
    after = [t for t in oks if t >= cleared_at]
    for i in range(len(after) - needed + 1):
        if after[i + needed - 1] - after[i] <= window_s:
            return after[i] - cleared_at
    raise AssertionError(f"throughput never returned to half its baseline of {baseline_rate:.0f}/s")


def ok_rate(calls: Sequence[Call], start: float, end: float) -> float:
    """Correct answers per second between two monotonic instants."""
    return sum(1 for c in calls if c.status == "ok" and start <= c.finished < end) / (end - start)


def timeline(calls: Sequence[Call], origin: float, step_s: float = 0.5) -> str:
    """Outcomes per ``step_s`` after ``origin``, for failure messages: ``+1.5s ok=120 timeout=3``."""
    buckets: dict[int, Counter[str]] = {}
    for call in calls:
        key = call.status if call.status == "ok" else str(call.error_code)
        buckets.setdefault(int((call.finished - origin) // step_s), Counter())[key] += 1
    return "\n".join(
        f"{slot * step_s:+.1f}s " + " ".join(f"{k}={v}" for k, v in sorted(buckets[slot].items()))
        for slot in sorted(buckets)
    )


def answered_figures(calls: Sequence[Call], planned: int) -> dict[str, int | float | str]:
    """The figures every load scenario reports: who was answered, how, and how late."""
    codes = Counter(str(c.error_code) for c in calls if c.status != "ok")
    return {
        "callers answered": f"{len(calls):,} of {planned:,}",
        "ok": sum(1 for c in calls if c.status == "ok"),
        "not ok, by code": ", ".join(f"{code} {n:,}" for code, n in sorted(codes.items())) or "none",
        "worst answer past deadline (ms)": round(max(0.0, max(c.late_ms for c in calls)), 2),
    }
