"""One script's run inside a call: run it under its limits, decode and check its output, and
report its costs. Shared by single-script calls and by the parts of a join or chain."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jsonschema
import wasmtime

from scriptpool.config import Limits
from scriptpool.config.errors import ExecutionError, InvalidOutput, ScriptpoolError
from scriptpool.config.wire import ExecutionReport
from scriptpool.engine import CODEC_JSON, CODEC_MSGPACK, Sandbox, SandboxRun
from scriptpool.runtime._codec import from_json, from_msgpack, to_msgpack
from scriptpool.runtime._input import ScriptInput
from scriptpool.runtime._writes import NO_WRITES, StoreWrite, take_writes

if TYPE_CHECKING:
    from scriptpool.engine import GuestProfiler
    from scriptpool.registry import Deployment
    from scriptpool.runtime._queries import EpQueries
    from scriptpool.runtime._reducers import Reducer


@dataclass(frozen=True, slots=True)
class EpRuntime:
    """An extension point prepared for the hot path: limits merged, schemas compiled once, and
    how its apps' scripts combine; its scale rules (empty: fixed limits), whether its runs are
    traced for capture at all, and the share of its successful runs that are captured."""

    limits: Limits
    input_validator: Any
    output_validator: Any
    input_validation_rate: float
    combine: str
    reducer: Reducer | None
    scale: dict[str, float] = field(default_factory=dict)
    capture_rate: float = 0.0
    capture: bool = True
    # The EP's input schema and its apps' compiled queries; None for an EP without a schema.
    queries: EpQueries | None = None
    # How long a session's data lives after a script's write (ExtensionPoint.session_ttl_s;
    # None: the store's default).
    session_ttl_s: int | None = None


@dataclass(frozen=True, slots=True)
class LoadedScript:
    """A deployment with its module (and pinned providers) loaded for running."""

    deployment: Deployment
    module: wasmtime.Module
    providers: dict[str, wasmtime.Module]
    source: str  # "hot", "deserialized" or "compiled"


@dataclass(frozen=True, slots=True)
class ScriptRun:
    """How one script's run went: its decoded output, or the named error that stopped it."""

    output: Any
    error: ScriptpoolError | None
    run: SandboxRun | None
    decode_ms: float
    # The writes its output listed (``storeWrites``, taken out of ``output``), checked; none
    # when it failed.
    writes: tuple[StoreWrite, ...] = NO_WRITES


def run_script(
    sandbox: Sandbox,
    script: LoadedScript,
    stdin: bytes,
    limits: Limits,
    validator: Any,
    *,
    profiler: GuestProfiler | None = None,
    session: bool = False,
) -> ScriptRun:
    """Run ``script`` on ``stdin`` and decode its output; never raises for what the script did.

    The output's ``storeWrites`` are taken out before the output schema sees it, and checked
    (``scriptpool.runtime._writes``; ``session``: whether the call has one): a bad write fails
    the run."""
    run = sandbox.run(
        script.module,
        stdin,
        limits,
        export=script.deployment.export,
        providers=script.providers,
        profiler=profiler,
    )
    if run.error is not None:
        return ScriptRun(None, run.error, run, 0.0)
    started = time.perf_counter()
    try:
        decoded = decode_output(run.stdout, None, script.deployment.codec)
        output, writes = take_writes(decoded, session=session)
        if validator is not None:
            validate(validator, output, InvalidOutput, "output")
    except ScriptpoolError as exc:
        return ScriptRun(None, exc, run, ms(time.perf_counter() - started))
    return ScriptRun(output, None, run, ms(time.perf_counter() - started), writes)


def encode_for(data: ScriptInput, codec: str) -> tuple[bytes, ScriptInput]:
    """An input as the bytes a script of ``codec`` reads, and the input, decoded if that needed
    it: a JSON script reads the JSON text as it came (a host value encoded), a MessagePack
    script the decoded value. The pool, local runs and replays all encode here."""
    if codec == CODEC_MSGPACK:
        data = data.decoded()
        return to_msgpack(data.json_value), data
    return data.json(), data


def decode_output(stdout: bytes, validator: Any, codec: str = CODEC_JSON) -> Any:
    """A script's output as a JSON value, checked against the EP's output schema."""
    if not stdout:
        raise InvalidOutput("the script wrote no output (a script prints its result on stdout)")
    if codec == CODEC_MSGPACK:
        output = from_msgpack(stdout)
    else:
        try:
            text = stdout.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidOutput(f"output is not UTF-8: {exc.reason} at byte {exc.start}") from None
        output = from_json(text)
    if validator is not None:
        validate(validator, output, InvalidOutput, "output")
    return output


def validate(validator: Any, value: Any, error: type[ExecutionError], what: str) -> None:
    failure = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if failure is not None:
        path = "/".join(str(p) for p in failure.absolute_path) or "(root)"
        raise error(f"{what} fails its schema at {path}: {failure.message}", path=path)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


def script_report(
    script: LoadedScript | None,
    lookup_ms: float,
    input_bytes: int,
    outcome: ScriptRun | None,
    scale_factor: float = 1.0,
    *,
    app: str = "",
) -> ExecutionReport:
    """The report of whatever stages ran; the fields of stages that did not run keep defaults.
    ``app`` names the app when no script was loaded (a loaded script's deployment says it)."""
    if script is None:
        return ExecutionReport(lookup_ms=lookup_ms, scale_factor=scale_factor, app=app)
    deployment = script.deployment
    run = outcome.run if outcome is not None else None
    if run is None:
        return ExecutionReport(
            input_bytes=input_bytes,
            lookup_ms=lookup_ms,
            module_source=script.source,
            sha256=deployment.sha256,
            version=deployment.version,
            codec=deployment.codec,
            scale_factor=scale_factor,
            app=deployment.app,
        )
    return ExecutionReport(
        instructions=run.instructions,
        peak_memory_bytes=run.peak_memory_bytes,
        input_bytes=input_bytes,
        output_bytes=len(run.stdout),
        logs=run.logs,
        lookup_ms=lookup_ms,
        instantiate_ms=ms(run.instantiate_s),
        run_ms=ms(run.run_s),
        decode_ms=outcome.decode_ms if outcome is not None else 0.0,
        store_writes=len(outcome.writes) if outcome is not None else 0,
        module_source=script.source,
        sha256=deployment.sha256,
        version=deployment.version,
        codec=deployment.codec,
        scale_factor=scale_factor,
        app=deployment.app,
    )


@dataclass(frozen=True, slots=True)
class ScriptTrace:
    """One script's run in a call, kept when the caller of ``Executor.execute`` asks (a worker
    does, to capture failed and sampled runs after the reply). Holds what was there anyway: the
    JSON input the script got, the limits it ran under, and how it went."""

    deployment: Deployment
    input: bytes
    limits: Limits
    part: str  # scriptpool.runtime.PART_SINGLE, PART_JOIN, PART_CHAIN or PART_REDUCER
    capture_rate: float
    error: ScriptpoolError | None
    outcome: ScriptRun | None
    report: ExecutionReport

    @property
    def ok(self) -> bool:
        return self.error is None
