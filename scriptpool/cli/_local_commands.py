"""``scriptpool run --local``: one module run in this process, without Redis or workers, on the
pool's own path (``scriptpool.registry.compile_script``, ``scriptpool.runtime.run_loaded``), with
function-runner's report.

``--json`` prints function-runner's fields first, with the same meaning, so a script written for
``function-runner --json`` reads it unchanged:

* ``name``: the module's file name; ``size``: the module's size in KiB (integer division);
* ``memory_usage``: the peak size of the largest memory of the run (module, provider or glue),
  in KiB; ``instructions``: the instructions (wasmtime fuel) the module used, provider work not
  counted;
* ``logs``: what the script logged, and on failure the error's message after it;
* ``input``: the input; ``output``: the output decoded to JSON, or, when it does not decode,
  ``{"error": ..., "stdout": ...}`` (function-runner's invalid-output form);
* ``success``: whether the module ran to its end (an output that does not decode, or fails the
  EP's output schema, is still a success here, as in function-runner; a limit, trap or non-zero
  exit is not).

Then ours: ``error_code`` and ``error`` (the pool's named error, None on success), ``codec``,
``scale_factor``, ``limits`` (in force, after scaling), ``input_bytes``, ``output_bytes``,
``sha256``, ``export``, ``providers`` and, with ``--profile``, ``profile``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any

from scriptpool.cli._files import read_json, read_module
from scriptpool.cli._output import dumps, exit_code_for, print_json
from scriptpool.config import Settings, largest_input_bytes, scale_factor, scaled_limits
from scriptpool.config.errors import InputTooLarge, InvalidArgument, InvalidOutput, ScriptpoolError
from scriptpool.config.wire import encode_input

if TYPE_CHECKING:
    from scriptpool.engine import GuestProfiler
    from scriptpool.runtime import LocalRun

# An input file may hold whitespace: it is read up to this many times the input limit.
INPUT_TEXT_FACTOR = 4
# Profile formats by the output file's name; anything else gets speedscope's JSON.
FOLDED_SUFFIXES = (".folded", ".perf", ".txt")


def add_arguments(run: argparse.ArgumentParser) -> None:
    """The ``run`` command's local-run options."""
    run.add_argument(
        "--local",
        metavar="MODULE",
        help="run MODULE (.wasm or .wat) in this process instead of the pool, with no Redis or "
        "workers, and print function-runner's report",
    )
    run.add_argument("--export", default="_start", help="with --local: the entry export (default _start)")
    run.add_argument(
        "--provider",
        action="append",
        metavar="NAME=FILE",
        help="with --local: a provider module the script imports by NAME; repeat for several",
    )
    run.add_argument(
        "--ep",
        dest="limits_ep",
        metavar="EP",
        help="with --local: run under this extension point's limits, scale rules and output schema "
        "(read from Redis); default: the default limits",
    )
    run.add_argument(
        "--profile",
        metavar="OUT",
        help="with --local: write where the instructions went to OUT: speedscope's JSON "
        "(open it at speedscope.app), or folded stacks if OUT ends in .folded, .perf or .txt",
    )


def cmd_run_local(args: argparse.Namespace, settings: Settings) -> int:
    from scriptpool.engine import GuestProfiler, Sandbox, interval_for
    from scriptpool.registry import compile_provider, compile_script, compile_validator
    from scriptpool.runtime import local_script, run_loaded

    if args.ep is not None or args.shop is not None:
        raise InvalidArgument("run --local takes no EP SHOP (use --ep EP for an extension point's limits)")
    if args.input is None:
        raise InvalidArgument("run --local needs --input FILE (or - for stdin): the input JSON")
    limits, scale, validator = settings.limits, {}, None
    if args.limits_ep:
        from scriptpool.cli._registries import open_registry

        definition = open_registry(settings).extension_point(args.limits_ep)
        limits, scale = definition.limits(settings.limits), dict(definition.scale)
        validator = compile_validator(definition.output_schema)
    sandbox = Sandbox(settings.epoch_tick_ms)
    wasm = read_module(args.local, limits.module_bytes)
    providers = _providers(args.provider or (), sandbox, settings, limits.stack_bytes, compile_provider)
    compiled = compile_script(sandbox, wasm, limits, args.export, lambda module: _imported(module, providers))
    largest = largest_input_bytes(limits) if scale else limits.input_bytes
    value = read_json(args.input, INPUT_TEXT_FACTOR * largest, InputTooLarge, "input")
    payload = encode_input(value)  # minified, as the client sends it
    factor = scale_factor(value, scale) if scale else 1.0
    limits = scaled_limits(limits, factor)
    script = local_script(compiled, limits)
    # A local run never writes; a SESSION write is checked as in a call with a session when the
    # run is given one (``--session``), else refused as the pool refuses it.
    session = getattr(args, "session", None) is not None
    result = run_loaded(
        sandbox, script, payload, limits, output_validator=validator, scale_factor=factor, session=session
    )
    profile: dict[str, Any] | None = None
    if args.profile:
        # Runs are deterministic: the same run again, sampled about 2,000 times over its length.
        profiler = GuestProfiler(interval_for(result.report.instructions))
        again = run_loaded(
            sandbox,
            script,
            payload,
            limits,
            output_validator=validator,
            scale_factor=factor,
            profiler=profiler,
            session=session,
        )
        profile = _write_profile(args.profile, os.path.basename(args.local), profiler, again, result)
    report = function_runner_report(os.path.basename(args.local), len(wasm), value, result, profile)
    if args.json:
        print_json(report)
    else:
        _print(report)
    return exit_code_for(result.error_code)


def _providers(
    specs: Any, sandbox: Any, settings: Settings, stack_bytes: int, compile_provider: Any
) -> dict[str, tuple[Any, str]]:
    import hashlib

    found: dict[str, tuple[Any, str]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InvalidArgument(
                f"--provider takes NAME=FILE, like shopify_function_v2=provider.wasm; got {spec!r}"
            )
        wasm = read_module(path, settings.provider_max_bytes, what="provider")
        module = compile_provider(sandbox, name, wasm, settings.provider_max_bytes, stack_bytes)
        found[name] = (module, hashlib.sha256(wasm).hexdigest())
    return found


def _imported(module: Any, providers: dict[str, tuple[Any, str]]) -> dict[str, tuple[Any, str]]:
    """The given providers the module imports (the others are not linked, as in a deploy)."""
    wanted = {imp.module for imp in module.imports}
    return {name: provider for name, provider in providers.items() if name in wanted}


def function_runner_report(
    name: str, size: int, value: Any, result: LocalRun, profile: dict[str, Any] | None = None
) -> dict[str, Any]:
    """function-runner's JSON report of a run (see the module doc), then our fields."""
    from scriptpool.runtime import decode_output

    report, error = result.report, result.error
    success = error is None or isinstance(error, InvalidOutput)
    logs = report.logs
    if not success and error is not None:
        logs += ("" if not logs or logs.endswith("\n") else "\n") + error.message
    if result.ok:
        output: Any = result.output
    else:
        try:
            output = decode_output(result.stdout, None, result.deployment.codec)
        except ScriptpoolError as exc:
            output = {"error": exc.message, "stdout": result.stdout.decode("utf-8", errors="replace")}
    fields: dict[str, Any] = {
        "name": name,
        "size": size // 1024,
        "memory_usage": report.peak_memory_bytes // 1024,
        "instructions": report.instructions,
        "logs": logs,
        "input": value,
        "output": output,
        "success": success,
        "error_code": None if error is None else error.code,
        "error": None if error is None else {"message": error.message, "detail": error.detail},
        "codec": result.deployment.codec,
        "scale_factor": report.scale_factor,
        "limits": result.limits.as_dict(),
        "input_bytes": len(result.stdin),
        "output_bytes": len(result.stdout),
        "sha256": result.deployment.sha256,
        "export": result.deployment.export,
        "providers": {name: sha for name, sha in result.deployment.providers},
        # What the output's storeWrites asked for, checked: a local run applies none.
        "store_writes": [write.shown() for write in result.writes],
    }
    if profile is not None:
        fields["profile"] = profile
    return fields


def _write_profile(
    path: str, name: str, profiler: GuestProfiler, again: LocalRun, first: LocalRun
) -> dict[str, Any]:
    if path.endswith(FOLDED_SUFFIXES):
        text, kind = profiler.folded(), "folded"
    else:
        text, kind = json.dumps(profiler.speedscope(name)), "speedscope"
    try:
        with open(path, "w") as out:
            out.write(text)
    except OSError as exc:
        raise InvalidArgument(f"cannot write the profile to {path}: {exc.strerror or exc}") from None
    top = profiler.self_weights().most_common(5)
    return {
        "path": path,
        "format": kind,
        "samples": len(profiler.stacks),
        "interval": profiler.interval,
        "sampled_instructions": sum(profiler.weights),
        "unsampled_instructions": profiler.unsampled,
        "top": [{"function": f, "instructions": w} for f, w in top],
        # The profiled run must have done what the run reported above did.
        "same_run": again.report.instructions == first.report.instructions
        and again.error_code == first.error_code,
    }


def _print(report: dict[str, Any]) -> None:
    limits = report["limits"]
    status = (
        "ok"
        if report["error_code"] is None
        else f"error {report['error_code']}: {report['error']['message']}"
    )
    print(f"module:       {report['name']} ({report['size']} KiB, sha256 {report['sha256'][:12]}), "
          f"export {report['export']}, codec {report['codec']}")  # fmt: skip
    print(f"outcome:      {status}")
    print(f"output:       {dumps(report['output'])[:2000]}")
    if report["store_writes"]:
        print(f"writes:       {len(report['store_writes'])}, not applied (a local run never writes): "
              f"{dumps(report['store_writes'])[:2000]}")  # fmt: skip
    if report["logs"]:
        print("logs:         " + report["logs"].rstrip().replace("\n", "\n              "))
    scaled = f" (limits scaled x{report['scale_factor']:g})" if report["scale_factor"] != 1.0 else ""
    print(f"instructions: {report['instructions']:,} of {limits['fuel']:,}{scaled}")
    # Every figure with its unit, the limit's too: "64 KiB peak of 10,000 KiB", not "of 10,000".
    peak_kib, limit_kib = report["memory_usage"], limits["memory_bytes"] // 1024
    print(f"memory:       {peak_kib:,} KiB peak of {limit_kib:,} KiB (the limit of each memory)")
    print(f"input:        {report['input_bytes']:,} B of {limits['input_bytes']:,} B")
    print(f"output:       {report['output_bytes']:,} B of {limits['output_bytes']:,} B")
    profile = report.get("profile")
    if profile:
        top = ", ".join(f"{t['function']} {t['instructions']:,}" for t in profile["top"][:3])
        print(f"profile:      {profile['path']} ({profile['format']}, {profile['samples']} samples): {top}")
        if not profile["same_run"]:
            print("warning:      the sampled run went differently from the one above (profiled: that one)")
