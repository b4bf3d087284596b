"""Several apps' scripts in one call, on one worker where all of the shop's modules are hot.

* **join**: every script gets the call's input; the EP's reducer combines the outputs of the
  scripts that succeeded, in app order (app names sorted): ``concat:PATH`` (the first output,
  with the list at PATH replaced by every output's list at PATH, concatenated), ``first``,
  ``max:PATH`` / ``min:PATH`` (the output whose number at PATH is largest / smallest, the first
  on a tie), or ``wasm`` (the app named ``reducer`` gets ``{"outputs": [{"app", "output"}, ...]}``
  and prints the combined output).
* **chain**: scripts run in app order; each gets ``{"input": <the call's input>, "previous":
  <the output of the last script before it that succeeded, or null>}``; the call's output is
  the last successful script's.

A script that fails (trap, limit, invalid output, or an output the reducer cannot use) drops
only its own part, unless its app was deployed with ``block_on_failure``: then the call fails
with that part's error and the parts after it are skipped. Each script runs under the EP's
limits, but never past the call's deadline: its wall-clock limit is cut to the time left before
the deadline (less a margin for the reply), and a part with no time left is skipped with
``timeout``. So a slow script costs its own part, and the parts after it only what it left them.

Writes (``storeWrites``): each part's go to its own app's data; those of a part that failed are
never applied, and a call that fails (blocked, nothing combined, the reducer failed, or the
combined output fails the schema) applies none, the successful parts' included: the caller got
an error, as if nothing had run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scriptpool.config import Limits, check_input_size
from scriptpool.config.errors import DeadlineExceeded, InvalidOutput, ScriptNotFound, ScriptpoolError
from scriptpool.config.extension_points import JOIN, REDUCER_APP
from scriptpool.config.wire import (
    PART_ERROR,
    PART_OK,
    PART_SKIPPED,
    ErrorInfo,
    Execution,
    ExecutionReport,
    Part,
    encode_input,
)
from scriptpool.engine import Sandbox
from scriptpool.runtime._captured import PART_CHAIN, PART_JOIN, PART_REDUCER
from scriptpool.runtime._input import ScriptInput
from scriptpool.runtime._queries import NO_QUERY, QueryInfo, with_query
from scriptpool.runtime._script import (
    EpRuntime,
    LoadedScript,
    ScriptRun,
    ScriptTrace,
    encode_for,
    run_script,
    script_report,
    validate,
)
from scriptpool.runtime._writes import NO_WRITES, AppWrites, StoreWrite

if TYPE_CHECKING:
    from scriptpool.registry import BindingSet, Deployment

_SOURCES = ("hot", "deserialized", "compiled")  # a call's module source is its coldest part's
# At an EP with input queries: an app's query standing, and its own JSON input or the named
# error that keeps it from running (scriptpool.runtime._executor gives one per call).
PartInput = Callable[["Deployment"], tuple[QueryInfo, "bytes | ScriptpoolError"]]
# Kept back before the caller's deadline for pushing the reply.
REPLY_MS = 2
_NOTHING: Any = object()  # no output to give: every part failed, or the call is blocked
# A combined report's codec when its parts read and write different ones.
MIXED_CODECS = "mixed"


class PartsRunner:
    """Runs the parts of one join or chain call and combines them into one :class:`Execution`.

    ``threads`` > 1 runs a join's parts on that many threads (a chain's parts depend on each
    other and always run in turn); BENCHMARKS.md says why the default is 1.
    """

    def __init__(
        self,
        sandbox: Sandbox,
        load: Callable[[Deployment, EpRuntime], LoadedScript],
        tick_ms: int,
        *,
        threads: int = 1,
    ) -> None:
        self.sandbox = sandbox
        self.load = load
        self.tick_ms = tick_ms
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="scriptpool-part") if threads > 1 else None
        )

    def execute(
        self,
        ep: EpRuntime,
        bindings: BindingSet,
        stdin: bytes,
        lookup_ms: float,
        deadline: float | None,
        *,
        scale_factor: float = 1.0,
        trace: list[ScriptTrace] | None = None,
        part_input: PartInput | None = None,
        session: bool = False,
        writes: list[AppWrites] | None = None,
        session_ttl_s: int | None = None,
    ) -> Execution:
        """Run the parts on ``stdin`` (the call's JSON input) and combine them. With
        ``part_input`` (an EP with input queries), each app's part gets the JSON input it gives
        for that app instead, its report the app's query standing; a part whose input cannot be
        made fails alone, as a script that failed. ``session``: whether the call has one (a
        SESSION write needs it); a successful call appends its parts' writes to ``writes``."""
        contributors = bindings.contributors()
        if not contributors:
            raise ScriptNotFound("no app's script is deployed here, only the reducer")
        call = _Call(self, ep, stdin, deadline, scale_factor, trace)
        call.part_input = part_input
        call.session = session
        if ep.combine == JOIN:
            if self._pool is not None:
                for attempt in self._pool.map(lambda d: call.attempt(d, stdin), contributors):
                    call.record(attempt)
            else:
                for deployment in contributors:
                    call.record(call.attempt(deployment, stdin))
            output = call.reduce(bindings.reducer)
        else:
            output = _NOTHING
            for deployment in contributors:
                previous = None if output is _NOTHING else output
                attempt = call.record(call.attempt(deployment, stdin, previous=encode_input(previous)))
                if attempt.status == PART_OK:
                    output = attempt.output
        execution = call.finish(output, lookup_ms)
        if execution.ok and call.writes:
            if writes is not None:
                writes.extend(AppWrites(app, w, session_ttl_s) for app, w in call.writes)
            count = sum(len(w) for _, w in call.writes)
            execution = dataclasses.replace(
                execution, report=dataclasses.replace(execution.report, store_writes=count)
            )
        return execution


@dataclass(frozen=True, slots=True)
class _Attempt:
    """How one part went, before it is recorded in the call."""

    deployment: Deployment
    status: str
    error: ScriptpoolError | None
    report: ExecutionReport
    output: Any = None
    source: str | None = None
    writes: tuple[StoreWrite, ...] = NO_WRITES


class _Call:
    """The state of one call's parts as they run."""

    def __init__(
        self,
        runner: PartsRunner,
        ep: EpRuntime,
        stdin: bytes,
        deadline: float | None,
        scale_factor: float = 1.0,
        trace: list[ScriptTrace] | None = None,
    ) -> None:
        self.runner = runner
        self.ep = ep
        self.stdin = stdin
        self.deadline = deadline
        self.scale_factor = scale_factor
        self.trace = trace
        self.parts: list[Part] = []
        self.outputs: list[Any] = []  # of the parts that succeeded, in app order
        self.blocked: ErrorInfo | None = None
        self.sources: list[str] = []
        self.deployments: list[Deployment] = []  # of every part, the reducer included, in turn
        # Each app's own input at an EP with input queries (None: every part gets ``stdin``).
        self.part_input: PartInput | None = None
        self.session = False  # whether the call has a session: a SESSION write needs one
        self.writes: list[tuple[str, tuple[StoreWrite, ...]]] = []  # successful parts', by app

    def attempt(
        self, deployment: Deployment, stdin: bytes, *, usable: bool = True, previous: bytes | None = None
    ) -> _Attempt:
        """Run one app's script (thread-safe: it changes nothing in the call); in a chain,
        ``previous`` is the JSON output it follows."""
        if self.blocked is not None:  # the call's error says which app blocked it
            return _Attempt(deployment, PART_SKIPPED, None, ExecutionReport(app=deployment.app))
        limits = self._limits_now()
        if limits is None:
            late = DeadlineExceeded("not run: the call's deadline was too near")
            return _Attempt(deployment, PART_SKIPPED, late, ExecutionReport(app=deployment.app))
        script: LoadedScript | None = None
        outcome: ScriptRun | None = None
        query = NO_QUERY
        if usable and self.part_input is not None:
            query, made = self.part_input(deployment)
            if isinstance(made, ScriptpoolError):  # no input this app may see: it does not run
                unrun = ExecutionReport(app=deployment.app)
                return _Attempt(deployment, PART_ERROR, made, with_query(unrun, query))
            stdin = made
        if previous is not None:
            stdin = b'{"input":%s,"previous":%s}' % (stdin, previous)
        given = stdin  # the JSON this part gets, as captured
        try:
            script = self.runner.load(deployment, self.ep)
            # The call's input is JSON text, the part's its codec.
            stdin = encode_for(ScriptInput(stdin), deployment.codec)[0]
            check_input_size(stdin, limits)
            outcome = run_script(
                self.runner.sandbox, script, stdin, limits, self.ep.output_validator, session=self.session
            )
            if outcome.error is not None:
                raise outcome.error
            if usable and self.ep.reducer is not None:
                self.ep.reducer.check(outcome.output)
        except ScriptpoolError as exc:
            ran = script_report(script, 0.0, len(stdin), outcome, self.scale_factor, app=deployment.app)
            report = with_query(ran, query)
            if report.store_writes:  # a failed part writes nothing (its output's reducer check failed)
                report = dataclasses.replace(report, store_writes=0)
            if script is not None:
                self._traced(deployment, given, limits, usable, exc, outcome, report)
            return _Attempt(deployment, PART_ERROR, exc, report, source=script.source if script else None)
        report = with_query(script_report(script, 0.0, len(stdin), outcome, self.scale_factor), query)
        self._traced(deployment, given, limits, usable, None, outcome, report)
        return _Attempt(deployment, PART_OK, None, report, outcome.output, script.source, outcome.writes)

    def _traced(
        self,
        deployment: Deployment,
        given: bytes,
        limits: Limits,
        usable: bool,
        error: ScriptpoolError | None,
        outcome: ScriptRun | None,
        report: ExecutionReport,
    ) -> None:
        if self.trace is None or not self.ep.capture:
            return
        part = PART_REDUCER if not usable else PART_JOIN if self.ep.combine == JOIN else PART_CHAIN
        rate = self.ep.capture_rate
        self.trace.append(ScriptTrace(deployment, given, limits, part, rate, error, outcome, report))

    def record(self, attempt: _Attempt) -> _Attempt:
        """Add one part to the call: its entry, its output, and whether it blocks the call."""
        deployment, error = attempt.deployment, attempt.error
        info = ErrorInfo.from_exception(error) if error is not None else None
        self.parts.append(Part(deployment.app, deployment.version, attempt.status, info, attempt.report))
        self.deployments.append(deployment)
        if attempt.source is not None:
            self.sources.append(attempt.source)
        if attempt.status == PART_OK:
            self.outputs.append(attempt.output)
            if attempt.writes:
                self.writes.append((deployment.app, attempt.writes))
        elif deployment.block_on_failure and self.blocked is None and error is not None:
            self.blocked = ErrorInfo(
                error.code, f"app {deployment.app} failed and blocks the call: {error.message}"
            )
        return attempt

    def reduce(self, reducer_app: Deployment | None) -> Any:
        """The join's combined output (_NOTHING when nothing can be combined)."""
        if self.blocked is not None or not self.outputs:
            return _NOTHING
        reducer = self.ep.reducer
        assert reducer is not None  # a join EP always has one
        if reducer.kind != "wasm":
            return reducer.combine(self.outputs)
        if reducer_app is None:
            self.blocked = ErrorInfo(
                ScriptNotFound.code, f"the join's Wasm reducer (app {REDUCER_APP!r}) is not deployed"
            )
            return _NOTHING
        apps = [part.app for part in self.parts if part.status == PART_OK]
        stdin = encode_input(
            {"outputs": [{"app": a, "output": o} for a, o in zip(apps, self.outputs, strict=True)]}
        )
        before = len(self.outputs)
        reducing = dataclasses.replace(reducer_app, block_on_failure=True)
        attempt = self.record(self.attempt(reducing, stdin, usable=False))
        del self.outputs[before:]  # the reducer's output is the call's, not a part to combine
        return attempt.output if attempt.status == PART_OK else _NOTHING

    def finish(self, output: Any, lookup_ms: float) -> Execution:
        report = self._report(lookup_ms)
        if self.blocked is not None:
            return Execution(False, None, self.blocked, report, tuple(self.parts))
        if output is _NOTHING:
            failed = next((p.error for p in self.parts if p.error is not None), None)
            code = failed.code if failed is not None else ScriptpoolError.code
            error = ErrorInfo(code, f"no app's script succeeded ({len(self.parts)} ran)")
            return Execution(False, None, error, report, tuple(self.parts))
        if self.ep.output_validator is not None:
            try:
                validate(self.ep.output_validator, output, InvalidOutput, "combined output")
            except InvalidOutput as exc:
                return Execution(False, None, ErrorInfo.from_exception(exc), report, tuple(self.parts))
        return Execution(True, output, None, report, tuple(self.parts))

    def _limits_now(self) -> Limits | None:
        """The EP's limits with the wall clock cut to the time left before the deadline, or None
        when no time is left."""
        limits = self.ep.limits
        if self.deadline is None:
            return limits
        # The wall clock is counted in epoch ticks, and a run may last one tick more than its
        # limit (the sandbox adds one, as the first may come at once): a part that may use
        # ``ticks`` ticks stops by (ticks + 1) ticks from now. REPLY_MS are kept for the reply.
        tick = self.runner.tick_ms
        left_ms = (self.deadline - time.time()) * 1000 - REPLY_MS
        ticks = int(left_ms // tick) - 1
        if ticks < 1:
            return None
        return limits if ticks * tick >= limits.wall_ms else dataclasses.replace(limits, wall_ms=ticks * tick)

    def _report(self, lookup_ms: float) -> ExecutionReport:
        """The call's report: costs summed over the parts (peak memory the largest), and for
        what ran, values that hold for the whole call: ``version`` 0 (no one version: each
        part's is in ``parts``), ``sha256`` the digest of every part's app and module sha256 in
        turn, skipped parts' too (equal for two calls exactly when they had the same modules
        bound as the same apps), and
        ``codec`` the parts' codec, or ``mixed`` when they differ."""
        reports = [part.report for part in self.parts]
        coldest = max((_SOURCES.index(s) for s in self.sources), default=0)
        ran = hashlib.sha256("".join(f"{d.app} {d.sha256}\n" for d in self.deployments).encode())
        codecs = {d.codec for d in self.deployments}
        return ExecutionReport(
            instructions=sum(r.instructions for r in reports),
            peak_memory_bytes=max((r.peak_memory_bytes for r in reports), default=0),
            input_bytes=len(self.stdin),
            output_bytes=sum(r.output_bytes for r in reports),
            lookup_ms=lookup_ms,
            instantiate_ms=round(sum(r.instantiate_ms for r in reports), 4),
            run_ms=round(sum(r.run_ms for r in reports), 4),
            decode_ms=round(sum(r.decode_ms for r in reports), 4),
            module_source=_SOURCES[coldest],
            sha256=ran.hexdigest(),
            version=0,
            codec=codecs.pop() if len(codecs) == 1 else MIXED_CODECS,
            scale_factor=self.scale_factor,
        )
