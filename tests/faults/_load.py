"""Bounded load from real host clients: threads calling ``Client.run``, every call recorded; and
:func:`under_load`, the fault scenarios' "put load on, break something, assert recovery and that
a good script runs right after"."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from scriptpool.config import Settings
from scriptpool.producer import BreakerPolicy, Client, Outcome
from tests.pool import WorkerProcess, start_workers

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

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called (so not all of the plan was offered)."""
        return self._stop.is_set()

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


class UnderLoad:
    """A pool under load while a test breaks something: what :func:`under_load` yields.

    ``client`` is the callers' client, ``workers`` the pool's processes by start order (their
    pids as at the start in ``pids``), ``broken_at`` when the body began (the load had reached its
    ``break_after`` calls), ``cleared_at`` when the body called :meth:`cleared` (the fault was
    undone), else when the body ended. After the block, ``calls`` holds every caller's call and
    ``after`` a good call per shop of the plan made right after the load, on the same workers."""

    def __init__(self, client: Client, load: Load, workers: list[WorkerProcess]) -> None:
        self.client = client
        self.load = load
        self.workers = workers
        self.pids = [w.process.pid for w in workers]
        self.broken_at = time.monotonic()
        self.cleared_at: float | None = None
        self.finished_at = 0.0
        self.calls: list[Call] = []
        self.after: list[tuple[Planned, Outcome]] = []
        self.alive: dict[str, bool] = {}

    def cleared(self) -> float:
        """Mark the fault undone (now); returns the instant."""
        self.cleared_at = time.monotonic()
        return self.cleared_at

    def join(self) -> list[Call]:
        """Wait for every caller (once; the block's end does it if the body did not)."""
        if not self.finished_at:
            self.calls = self.load.join()
            self.finished_at = time.monotonic()
        return self.calls

    def assert_recovered(self, *, dead: Sequence[str] = (), within_s: float | None = 5.0) -> float | None:
        """What every load scenario asserts: every planned call answered (all of the plan unless
        the load was stopped), none wrong, none later than its deadline + 50 ms; the workers not
        in ``dead`` alive and the same processes; with ``within_s``, throughput back within that
        many seconds of :attr:`cleared_at` (returned); and a good call on every shop of the plan
        right after the load answered correctly. Failures show the calls' timeline."""
        cleared_at = self.cleared_at if self.cleared_at is not None else self.finished_at
        plan = self.load.plan
        if not self.load.stopped:
            assert len(self.calls) == len(plan) and len({c.index for c in self.calls}) == len(plan)
        assert not wrong_results(plan, self.calls), timeline(self.calls, self.broken_at)
        worst_late_ms = max(c.late_ms for c in self.calls)
        assert worst_late_ms <= 50, f"a caller waited {worst_late_ms:.1f} ms past its deadline"
        survivors = [w for w in self.workers if w.name not in dead]
        assert all(self.alive[w.name] for w in survivors), self.alive
        assert [w.process.pid for w in survivors] == [
            pid for w, pid in zip(self.workers, self.pids, strict=True) if w.name not in dead
        ]
        recovered_s = None
        if within_s is not None:
            try:
                recovered_s = recovery_s(self.calls, cleared_at)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{timeline(self.calls, cleared_at)}") from None
            assert recovered_s <= within_s, timeline(self.calls, cleared_at)
        bad_after = [
            (p.shop, o.status, o.error_code) for p, o in self.after if not o.ok or o.output != p.expected
        ]
        assert self.after and not bad_after, f"good calls right after the load failed: {bad_after}"
        return recovered_s


@contextmanager
def under_load(
    settings: Settings,
    plan: Sequence[Planned],
    layout: dict[str, list[int]],
    *,
    rate: float,
    timeout_s: float,
    break_after: int,
    threads: int = 8,
    breaker: BreakerPolicy | None = None,
    client_settings: Settings | None = None,
) -> Iterator[UnderLoad]:
    """Start the workers of ``layout`` (name -> shards) on ``settings``, put ``plan`` on them
    from ``threads`` threads of one client (on ``client_settings``, default ``settings``) at
    ``rate``, and once ``break_after`` calls are done run the block, which breaks something
    (and calls :meth:`UnderLoad.cleared` once it is undone). After the block: every caller is
    joined, a good call runs on every shop of the plan (its first planned call whose output is
    known), and the workers are stopped (SIGKILLed if the block failed). Then
    :meth:`UnderLoad.assert_recovered` asserts what every scenario does."""
    workers = start_workers(settings, layout)
    ok = False
    try:
        with Client(client_settings or settings, breaker=breaker) as client:
            load = Load(client, plan, threads=threads, timeout_s=timeout_s, rate=rate).start()
            load.wait_for(break_after)
            run = UnderLoad(client, load, workers)
            yield run
            if run.cleared_at is None:
                run.cleared()
            run.join()
            run.alive = {w.name: w.alive for w in workers}
            firsts = {(p.ep, p.shop): p for p in reversed(plan) if p.expected is not None}
            for planned in firsts.values():
                outcome = client.run(planned.ep, planned.shop, planned.input, timeout=5)
                run.after.append((planned, outcome))
        ok = True
    finally:
        for worker in workers:
            if ok:
                worker.stop()
            else:
                worker.kill()
