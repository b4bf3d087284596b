"""The runtime's executor: look up, load (hot, deserialized or compiled), run, decode, report."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import wasmtime

from scriptpool.config import (
    ExtensionPoint,
    Settings,
    check_ep,
    check_input_size,
    check_shop_id,
    largest_input_bytes,
    scale_factor,
    scaled_limits,
)
from scriptpool.config.errors import InputTooLarge, InvalidInput, ScriptpoolError
from scriptpool.config.extension_points import SINGLE
from scriptpool.config.wire import ErrorInfo, Execution, ExecutionReport
from scriptpool.engine import CODEC_JSON, Sandbox
from scriptpool.registry import CANARY, Candidate, compile_validator
from scriptpool.runtime._cache import ByteLRU, CacheStats
from scriptpool.runtime._captured import PART_SINGLE
from scriptpool.runtime._combine import PartInput, PartsRunner
from scriptpool.runtime._input import ScriptInput
from scriptpool.runtime._queries import NO_QUERY, STALE, EpQueries, QueryInfo, with_query
from scriptpool.runtime._reducers import Reducer
from scriptpool.runtime._script import (
    EpRuntime,
    LoadedScript,
    ScriptRun,
    ScriptTrace,
    encode_for,
    ms,
    run_script,
    script_report,
    validate,
)
from scriptpool.runtime._store import DataContext, StoreCache
from scriptpool.runtime._writes import AppWrites

if TYPE_CHECKING:
    from scriptpool.registry import BindingSet, Deployment, Registry


class Executor:
    """Runs deployed scripts in this process. Thread-safe; keep one per process.

    Hot state: compiled modules in a byte-bounded LRU, bindings and extension points in dicts
    that :meth:`invalidate` clears (and that expire after ``binding_cache_ttl_s`` as a backstop).
    """

    def __init__(
        self,
        registry: Registry,
        sandbox: Sandbox,
        settings: Settings,
        *,
        sample: Callable[[], float] = random.random,
        store: StoreCache | None = None,
    ) -> None:
        self._registry = registry
        # Script data that input queries select (``store(scope:, key:)``); made on first use
        # (on the settings' Redis: the shard group's, in a worker) unless given.
        self._store = store
        self._sandbox = sandbox
        self._settings = settings
        self._sample = sample
        self._modules: ByteLRU[wasmtime.Module] = ByteLRU(settings.module_cache_bytes)
        self._bindings: dict[tuple[str, str], tuple[BindingSet, float]] = {}
        self._eps = registry.extension_point_reader(self._prepare_ep)
        self._parts = PartsRunner(sandbox, self._load, settings.epoch_tick_ms, threads=settings.join_threads)
        self._lock = threading.Lock()

    # -- public --------------------------------------------------------------------------------
    def execute(
        self,
        ep: str,
        shop_id: str | int,
        payload: Any,
        *,
        deadline: float | None = None,
        trace: list[ScriptTrace] | None = None,
        queries: dict[str, str] | None = None,
        session: str | None = None,
        writes: list[AppWrites] | None = None,
    ) -> Execution:
        """Run what is bound to (``ep``, ``shop_id``) on ``payload``: JSON text (bytes), a host
        value (a JSON value), or a :class:`ScriptInput`.

        At an EP with an input schema, each app deployed with an input query gets that query's
        result over ``payload`` (``scriptpool.runtime._queries``); ``queries`` is the job's
        word on what the client projected ``payload`` for (``Job.queries``), which each such
        app's report compares with its binding.

        ``deadline`` (Unix seconds) is the caller's: the parts of a join or chain are never run
        past it (a single script runs under its EP's limits alone). With ``trace``, each script
        that ran (or was about to) is appended to it, for capture after the reply. During a
        rollout, ``report.rollout`` says which version served and whether the candidate shadows
        the call.

        ``session`` is the call's session token (a SESSION write needs one). With ``writes``, a
        successful call appends each app's checked ``storeWrites`` to it, for the caller to apply
        after the reply; a canary candidate's are left out (a candidate never writes).
        """
        started = time.perf_counter()
        data = ScriptInput.of(payload)
        try:
            runtime, bindings = self._lookup(check_ep(ep), check_shop_id(shop_id))
        except ScriptpoolError as exc:
            report = ExecutionReport(lookup_ms=ms(time.perf_counter() - started))
            return Execution(False, None, ErrorInfo.from_exception(exc), report)
        candidate = bindings.candidate
        if candidate is None:
            return self._run(runtime, bindings, data, started, deadline, trace, queries, session, writes)
        if candidate.state == CANARY:  # the JSON text is hashed: the same input, the same version
            served = CANARY if candidate.in_canary(data.json()) else CONTROL
        else:
            served = SHADOWED if self._sample() < candidate.rules.shadow_rate else LIVE
        runs = bindings.with_candidate() if served == CANARY else bindings
        ran: list[AppWrites] | None = [] if writes is not None else None
        execution = self._run(runtime, runs, data, started, deadline, trace, queries, session, ran)
        report = dataclasses.replace(execution.report, rollout=served, rollout_id=candidate.id)
        if ran:
            kept = [w for w in ran if served != CANARY or w.app != candidate.app]
            if writes is not None:
                writes.extend(kept)
            if len(kept) != len(ran):
                report = dataclasses.replace(report, store_writes=sum(len(w.writes) for w in kept))
        return dataclasses.replace(execution, report=report)

    def run_candidate(
        self,
        ep: str,
        shop_id: str,
        payload: Any,
        rollout_id: str,
        *,
        queries: dict[str, str] | None = None,
        session: str | None = None,
    ) -> tuple[Candidate, Execution] | None:
        """For a shadow run: the candidate of rollout ``rollout_id`` at (``ep``, ``shop_id``), if
        that rollout is still under way, and its execution on ``payload`` (as :meth:`execute`
        takes it). ``queries`` is the job's (``Job.queries``; the candidate's own query under
        ``#candidate``): the candidate is judged on what the live script got, with the call's
        ``session``'s data (as this process holds it now). No deadline: nobody waits, and
        its ``storeWrites`` are never applied."""
        candidate = self.candidate(ep, shop_id, rollout_id)
        if candidate is None:
            return None
        runtime, bindings = self._lookup(ep, shop_id)
        if bindings.candidate != candidate:  # changed in between: too late for this call
            return None
        data = ScriptInput.of(payload)
        # No ``writes``: a candidate's storeWrites are checked as the live script's, never applied.
        shadow = self._run(
            runtime, bindings.with_candidate(), data, time.perf_counter(), None, None, queries, session
        )
        return candidate, shadow

    def candidate(self, ep: str, shop_id: str, rollout_id: str) -> Candidate | None:
        """The candidate of rollout ``rollout_id`` at (``ep``, ``shop_id``), or None once that
        rollout is over. A cached binding that names another rollout is read again first: the
        call being judged may be newer than the cache."""
        candidate = self._lookup(ep, shop_id)[1].candidate
        if candidate is None or candidate.id != rollout_id:
            self.invalidate(ep, shop_id)
            candidate = self._lookup(ep, shop_id)[1].candidate
        return candidate if candidate is not None and candidate.id == rollout_id else None

    def _run(
        self,
        runtime: EpRuntime,
        bindings: BindingSet,
        data: ScriptInput,
        started: float,
        deadline: float | None,
        trace: list[ScriptTrace] | None,
        queries: dict[str, str] | None = None,
        session: str | None = None,
        writes: list[AppWrites] | None = None,
    ) -> Execution:
        script: LoadedScript | None = None
        app = ""  # the single script's app, known before its module loads (or fails to)
        lookup_ms: float | None = None
        input_bytes = 0
        factor = 1.0
        outcome: ScriptRun | None = None
        query = NO_QUERY
        try:
            if queries and runtime.queries is None and "" not in queries.values():
                # The client projected the input for queries (it sends the whole input when some
                # app has none), but the EP has no input schema (any more): no script may read a
                # projection as the whole input.
                query = ("", STALE)
                raise InvalidInput(
                    "the client sent the input projected for input queries, but the EP has no "
                    "input schema now (it had not yet heard of the redefinition): not run on a "
                    "partial input; the client's next call sends the whole input",
                    client=STALE,
                )
            if runtime.scale:
                runtime, factor, data = _scaled(runtime, data)
            if runtime.combine == SINGLE:
                single = bindings.only()
                app = single.app
                script = self._load(single, runtime)
            lookup_ms = ms(time.perf_counter() - started)
            if script is None:  # each part encodes the input in its own codec
                # With input queries, the EP's input schema checks only a whole input.
                whole = runtime.queries is None or queries is None or "" in queries.values()
                stdin = self._prepare_input(data, runtime, CODEC_JSON, check=whole)
                part_input = (
                    None
                    if runtime.queries is None
                    else _part_input(runtime.queries, data, queries, DataContext(self.store, session))
                )
                return self._parts.execute(
                    runtime,
                    bindings,
                    stdin,
                    lookup_ms,
                    deadline,
                    scale_factor=factor,
                    trace=trace,
                    part_input=part_input,
                    session=session is not None,
                    writes=writes,
                    session_ttl_s=runtime.session_ttl_s,
                )
            if runtime.queries is not None:
                # The script gets its own query's result, whatever the client projected for.
                query = runtime.queries.info(script.deployment, queries)
                data = runtime.queries.input_for(
                    script.deployment, data, query, DataContext(self.store, session)
                )
            stdin = self._prepare_input(data, runtime, script.deployment.codec, check=query is NO_QUERY)
            input_bytes = len(stdin)
            outcome = run_script(
                self._sandbox,
                script,
                stdin,
                runtime.limits,
                runtime.output_validator,
                session=session is not None,
            )
            if outcome.error is not None:
                raise outcome.error
        except ScriptpoolError as exc:
            if lookup_ms is None:
                lookup_ms = ms(time.perf_counter() - started)
            report = script_report(script, lookup_ms, input_bytes, outcome, factor, app=app)
            if query is not NO_QUERY:
                report = with_query(report, query)
            if trace is not None and script is not None and runtime.capture:
                trace.append(_trace(script, runtime, data, exc, outcome, report))
            return Execution(False, None, ErrorInfo.from_exception(exc), report)
        report = script_report(script, lookup_ms, input_bytes, outcome, factor)
        if query is not NO_QUERY:
            report = with_query(report, query)
        if trace is not None and runtime.capture:
            trace.append(_trace(script, runtime, data, None, outcome, report))
        if writes is not None and outcome.writes:
            writes.append(AppWrites(script.deployment.app, outcome.writes, runtime.session_ttl_s))
        return Execution(True, outcome.output, None, report)

    def invalidate(self, ep: str | None = None, shop_id: str | None = None) -> None:
        """Forget cached bindings (of one pair, one EP, or all) and EP definitions; forgetting
        all (the listener's (re)subscription: messages may have been missed) forgets the cached
        script data too."""
        with self._lock:
            if ep is None:
                self._bindings.clear()
                self._eps.invalidate()
                if self._store is not None:
                    self._store.invalidate(None)
            elif shop_id is None:
                self._eps.invalidate(ep)
                for key in [k for k in self._bindings if k[0] == ep]:
                    del self._bindings[key]
            else:
                self._bindings.pop((ep, shop_id), None)

    @property
    def store(self) -> StoreCache:
        """This executor's cache of script data (made on first use)."""
        store = self._store
        if store is None:
            with self._lock:
                if self._store is None:
                    from scriptpool.config.redis import redis_client

                    client = redis_client(self._settings.redis_url, timeout=2, connect_timeout=1)
                    self._store = StoreCache(
                        client, self._settings.keys, backstop_s=self._settings.binding_cache_ttl_s
                    )
                store = self._store
        return store

    def apps(self, ep_name: str, shop_id: str) -> tuple[str, ...]:
        """The apps whose scripts a call at (EP, shop) runs, from the bindings this process holds
        (read once per TTL): what a call counts against, for quotas. Raises as a call would
        (an unknown EP, Redis lost)."""
        _, bindings = self._lookup(ep_name, shop_id)
        return tuple(deployment.app for deployment in bindings.contributors())

    def cache_stats(self) -> CacheStats:
        """Counters of the compiled-module cache."""
        return self._modules.stats()

    # -- lookup --------------------------------------------------------------------------------
    def _lookup(self, ep_name: str, shop_id: str) -> tuple[EpRuntime, BindingSet]:
        now = time.monotonic()
        runtime = self._eps.get(ep_name)
        cached = self._bindings.get((ep_name, shop_id))
        if cached is not None and cached[1] > now:
            return runtime, cached[0]
        bindings = self._registry.bindings(ep_name, shop_id)  # every app's, in one read
        with self._lock:
            self._bindings[(ep_name, shop_id)] = (bindings, now + self._settings.binding_cache_ttl_s)
        return runtime, bindings

    def _load(self, deployment: Deployment, ep: EpRuntime) -> LoadedScript:
        # A script was deployed under its EP's module size limit: none larger is compiled for it.
        module, source = self._module(deployment.sha256, ep.limits.stack_bytes, ep.limits.module_bytes)
        # Provider versions are pinned in the deployment, so the hot path never asks Redis.
        providers = {name: self._module(sha, ep.limits.stack_bytes)[0] for name, sha in deployment.providers}
        return LoadedScript(deployment, module, providers, source)

    def _prepare_ep(self, ep: ExtensionPoint) -> EpRuntime:
        rate = ep.input_validation_rate
        return EpRuntime(
            limits=ep.limits(self._settings.limits),
            input_validator=compile_validator(ep.input_schema),
            output_validator=compile_validator(ep.output_schema),
            input_validation_rate=self._settings.input_validation_rate if rate is None else rate,
            combine=ep.combine,
            reducer=Reducer.parse(ep.reducer) if ep.reducer else None,
            scale=dict(ep.scale),
            capture_rate=ep.capture_rate,
            capture=ep.capture,
            queries=None if ep.input_graphql is None else EpQueries(ep.input_graphql),
            session_ttl_s=ep.session_ttl_s,
        )

    def _module(
        self, sha256: str, stack_bytes: int, max_bytes: int | None = None
    ) -> tuple[wasmtime.Module, str]:
        key = (sha256, stack_bytes)
        module = self._modules.get(key)
        if module is not None:
            return module, "hot"
        module, source, size = self._registry.load_module(sha256, stack_bytes, max_bytes=max_bytes)
        self._modules.put(key, module, size)
        return module, source

    # -- input ---------------------------------------------------------------------------------
    def _prepare_input(self, data: ScriptInput, ep: EpRuntime, codec: str, *, check: bool = True) -> bytes:
        stdin, data = encode_for(data, codec)
        check_input_size(stdin, ep.limits)
        # Validation only sharpens error messages for script authors, so it is sampled. A query's
        # result is not the whole input the schema describes (``check`` False): it is not checked.
        if check and ep.input_validator is not None and self._sample() < ep.input_validation_rate:
            validate(ep.input_validator, data.for_schema(), InvalidInput, "input")
        return stdin


_UNSET: Any = object()
# report.rollout while a rollout is under way: who served the call, and what comes after it.
# Shadowing: the live version, and the candidate runs on it too (SHADOWED, a share shadow_rate of
# calls) or not (LIVE). Canary: the candidate (CANARY, the canary share) or the live version
# (CONTROL); both are counted, to compare their error rates.
SHADOWED, LIVE, CONTROL = "shadowed", "live", "control"
JUDGED = frozenset({SHADOWED, CANARY, CONTROL})  # what a worker hands to its shadow process


def _scaled(runtime: EpRuntime, data: ScriptInput) -> tuple[EpRuntime, float, ScriptInput]:
    """The EP with its limits scaled for this input, the factor, and the input, decoded if
    counting needed it.

    JSON text is decoded to count its lists, so text larger than any factor allows is refused
    before that; a host value is counted as it is, encoded (and normalised) later as without
    scaling."""
    if data.text is not None:
        largest = largest_input_bytes(runtime.limits)
        if len(data.text) > largest:
            raise InputTooLarge(
                f"input is {len(data.text)} bytes; even scaled the limit is {largest}",
                size=len(data.text),
                limit=largest,
            )
        data = data.decoded()
    factor = scale_factor(data.json_value, runtime.scale)
    if factor == 1.0:
        return runtime, factor, data
    return dataclasses.replace(runtime, limits=scaled_limits(runtime.limits, factor)), factor, data


def _part_input(
    queries: EpQueries, data: ScriptInput, sent: dict[str, str] | None, context: DataContext
) -> PartInput:
    """For a join or chain at an EP with an input schema: each part's query standing and its
    JSON input (its own query's result over what was sent, decoded once for all parts), or the
    named error that keeps it from running."""
    decoded: list[ScriptInput] = []

    def part(deployment: Deployment) -> tuple[QueryInfo, bytes | ScriptpoolError]:
        info = queries.info(deployment, sent)
        try:
            if deployment.input_query is not None and not decoded:
                decoded.append(data.decoded())
            return info, queries.input_for(deployment, decoded[0] if decoded else data, info, context).json()
        except ScriptpoolError as exc:
            return info, exc

    return part


def _trace(
    script: LoadedScript,
    runtime: EpRuntime,
    data: ScriptInput,
    error: ScriptpoolError | None,
    outcome: ScriptRun | None,
    report: ExecutionReport,
) -> ScriptTrace:
    return ScriptTrace(
        script.deployment,
        data.captured(),
        runtime.limits,
        PART_SINGLE,
        runtime.capture_rate,
        error,
        outcome,
        report,
    )
