"""One script run in this process, outside the pool: ``scriptpool run --local`` and
``scriptpool replay``. It takes the pool's own steps (``scriptpool.runtime._script``): the input encoded for
the module's codec and checked against the limits, then ``run_script``, which runs the module on
the sandbox and decodes and checks its output, then the pool's report. Only the lookup differs:
the module comes from a file or from the registry by its sha256, not from a binding.

Two things the pool does are not done here: the input schema check (the pool samples it; it
only sharpens error messages), and the caller's deadline (a local run has none). And nothing is
ever written: the writes a script's output lists (``storeWrites``) are checked as the pool
checks them and shown (:attr:`LocalRun.writes`), never applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scriptpool.config import Limits, check_input_size
from scriptpool.config.errors import ScriptpoolError
from scriptpool.config.wire import ExecutionReport
from scriptpool.engine import Sandbox
from scriptpool.registry import Deployment, compile_script, compile_validator
from scriptpool.runtime._captured import CapturedRun
from scriptpool.runtime._input import ScriptInput
from scriptpool.runtime._script import LoadedScript, ScriptRun, encode_for, run_script, script_report
from scriptpool.runtime._writes import NO_WRITES, StoreWrite

if TYPE_CHECKING:
    from scriptpool.engine import GuestProfiler
    from scriptpool.registry import CompiledScript, Registry


@dataclass(frozen=True, slots=True)
class LocalRun:
    """How one run outside the pool went, with what it ran on."""

    deployment: Deployment
    input: bytes  # the JSON input
    stdin: bytes  # what the script read: the input in its codec
    limits: Limits
    error: ScriptpoolError | None
    outcome: ScriptRun | None
    report: ExecutionReport

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output(self) -> Any:
        return self.outcome.output if self.ok and self.outcome is not None else None

    @property
    def writes(self) -> tuple[StoreWrite, ...]:
        """The writes a successful run's output listed, checked: shown, never applied."""
        return self.outcome.writes if self.ok and self.outcome is not None else NO_WRITES

    @property
    def stdout(self) -> bytes:
        run = self.outcome.run if self.outcome is not None else None
        return run.stdout if run is not None else b""

    @property
    def error_code(self) -> str | None:
        return self.error.code if self.error is not None else None


def run_loaded(
    sandbox: Sandbox,
    script: LoadedScript,
    json_input: bytes,
    limits: Limits,
    *,
    output_validator: Any = None,
    scale_factor: float = 1.0,
    profiler: GuestProfiler | None = None,
    session: bool = False,
) -> LocalRun:
    """Run ``script`` on ``json_input`` under ``limits``, as a worker runs a single script
    (``session``: whether the call is taken to have a session, which a SESSION write needs)."""
    stdin = b""
    outcome: ScriptRun | None = None
    error: ScriptpoolError | None = None
    try:
        stdin = encode_for(ScriptInput(json_input), script.deployment.codec)[0]
        check_input_size(stdin, limits)
        outcome = run_script(
            sandbox, script, stdin, limits, output_validator, profiler=profiler, session=session
        )
        error = outcome.error
    except ScriptpoolError as exc:
        error = exc
    report = script_report(script, 0.0, len(stdin), outcome, scale_factor)
    return LocalRun(script.deployment, json_input, stdin, limits, error, outcome, report)


def local_script(
    compiled: CompiledScript,
    limits: Limits,
    *,
    ep: str = "local",
    shop_id: str = "local",
    app: str = "default",
    version: int = 0,
) -> LoadedScript:
    """A compiled module as a deployment the run path takes (it is bound nowhere)."""
    deployment = Deployment(
        ep=ep,
        shop_id=shop_id,
        sha256=compiled.sha256,
        export=compiled.export,
        version=version,
        providers=compiled.providers,
        stack_bytes=limits.stack_bytes,
        deployed_at=0.0,
        app=app,
        codec=compiled.codec,
    )
    return LoadedScript(deployment, compiled.module, compiled.provider_modules, "compiled")


@dataclass(frozen=True, slots=True)
class Replayed:
    """A captured run run again, and how the new run compares with the recording."""

    run: CapturedRun
    result: LocalRun
    module: str  # "recorded" (the same version, by sha256) or "file"

    @property
    def same_output(self) -> bool:
        return self.result.stdout == self.run.stdout

    @property
    def same_error_code(self) -> bool:
        return self.result.error_code == self.run.error_code

    @property
    def same_instructions(self) -> bool:
        return self.result.report.instructions == self.run.report.instructions

    @property
    def identical(self) -> bool:
        return self.same_output and self.same_error_code and self.same_instructions


def replay(
    run: CapturedRun, registry: Registry, sandbox: Sandbox, *, module: bytes | None = None
) -> Replayed:
    """Run a captured run again in this process, on the same module version (loaded from the
    registry by its sha256) and its providers, the same input and the same limits; or, with
    ``module``, on that module instead (checked as a deploy checks it). ``registry`` must
    compile on ``sandbox`` (a module runs only on the engine it was compiled for)."""
    limits = Limits(**run.limits)
    providers = {name: (registry.compile_module(sha, limits.stack_bytes), sha) for name, sha in run.providers}
    if module is None:
        compiled_module = registry.compile_module(run.sha256, limits.stack_bytes)
        deployment = Deployment(
            ep=run.ep,
            shop_id=run.shop_id,
            sha256=run.sha256,
            export=run.export,
            version=run.version,
            providers=run.providers,
            stack_bytes=limits.stack_bytes,
            deployed_at=0.0,
            app=run.app,
            codec=run.codec,
        )
        script = LoadedScript(
            deployment, compiled_module, {name: m for name, (m, _) in providers.items()}, "compiled"
        )
    else:
        compiled = compile_script(sandbox, module, limits, run.export, lambda _: providers)
        script = local_script(
            compiled, limits, ep=run.ep, shop_id=run.shop_id, app=run.app, version=run.version
        )
    result = run_loaded(
        sandbox,
        script,
        run.input,
        limits,
        output_validator=_output_validator(registry, run.ep),
        scale_factor=run.scale_factor,
        session=run.session,
    )
    return Replayed(run, result, "recorded" if module is None else "file")


def _output_validator(registry: Registry, ep: str) -> Any:
    """The EP's output schema as it is now (None if the EP is gone)."""
    try:
        definition = registry.extension_point(ep)
    except ScriptpoolError:
        return None
    return compile_validator(definition.output_schema)
