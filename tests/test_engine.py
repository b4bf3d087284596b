"""The runtime (in process): the ABI, the report, every named error, and recovery after each.

Long on purpose: one short test per named error or promise of the sandbox and executor, sharing
the in-process registry, executor and sandbox fixtures and the ``run_good_after`` check; the
fast-path section tests the wasmtime internals those same runs go through."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest

from scriptpool.config import Limits
from scriptpool.config.wire import Execution
from scriptpool.engine import FIXED_TIME_NS, Sandbox, SandboxRun, _capi
from scriptpool.engine._capi import internals_problems
from scriptpool.engine._engine import POOL_LIMITS
from scriptpool.engine._guest_io import GuestIO
from scriptpool.registry import Registry
from scriptpool.runtime import Executor
from tests import guests
from tests.conftest import EXAMPLES

GOOD_INPUT = {"hello": "world", "n": [1, 2, 3]}


def run_good_after(executor: Executor, registry: Registry) -> None:
    """The same process must run a good script correctly right after a hostile one."""
    registry.deploy("test", "good-shop", guests.ECHO)
    result = executor.execute("test", "good-shop", GOOD_INPUT)
    assert result.ok, result.error
    assert result.output == GOOD_INPUT


def deploy_and_run(
    registry: Registry, executor: Executor, module: bytes, payload: object = None, *, ep: str = "test"
) -> Execution:
    registry.deploy(ep, "shop-1", module)
    return executor.execute(ep, "shop-1", {} if payload is None else payload)


def test_c_discount_script_runs_with_correct_output_and_report(
    registry: Registry, executor: Executor
) -> None:
    """A C-built discount script deploys and returns the expected discount with a full report."""
    wasm = (EXAMPLES / "discount" / "discount.wasm").read_bytes()
    payload = json.loads((EXAMPLES / "discount" / "input.json").read_text())
    expected = json.loads((EXAMPLES / "discount" / "expected_output.json").read_text())
    deployment = registry.deploy("discount", 1234, wasm)
    result = executor.execute("discount", 1234, payload)
    assert result.ok, result.error
    assert result.output == expected
    report = result.report
    assert report.instructions > 0
    assert report.peak_memory_bytes >= 65536
    minified = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    assert report.input_bytes == len(minified.replace("/", "\\/").encode())
    assert report.output_bytes > 0
    assert "qualifying lines: 2" in report.logs
    assert report.version == deployment.version == 1
    assert report.module_source == "deserialized"
    assert all(t >= 0 for t in (report.lookup_ms, report.instantiate_ms, report.run_ms, report.decode_ms))
    assert report.run_ms > 0


def test_c_cart_validation_script(registry: Registry, executor: Executor) -> None:
    """The C cart-validation script flags the offending line."""
    registry.define_extension_point("cart_validation")
    wasm = (EXAMPLES / "cart_validation" / "cart_validation.wasm").read_bytes()
    payload = json.loads((EXAMPLES / "cart_validation" / "input.json").read_text())
    expected = json.loads((EXAMPLES / "cart_validation" / "expected_output.json").read_text())
    registry.deploy("cart_validation", "shop-9", wasm)
    result = executor.execute("cart_validation", "shop-9", payload)
    assert result.ok, result.error
    assert result.output == expected


def test_c_script_bad_input_is_runtime_error_with_exit_code(registry: Registry, executor: Executor) -> None:
    """A C script that rejects its input and exits 1 gives runtime_error carrying the exit code."""
    wasm = (EXAMPLES / "discount" / "discount.wasm").read_bytes()
    registry.deploy("discount", "s", wasm)
    result = executor.execute("discount", "s", {"no_cart": True})
    assert result.error is not None
    assert result.error.code == "runtime_error"
    assert result.error.detail["exit_code"] == 1
    assert "cart" in result.report.logs


def test_hot_path_reuses_compiled_module(registry: Registry, executor: Executor) -> None:
    """The first run deserializes the artifact, later runs hit the in-process cache."""
    registry.deploy("test", "shop-1", guests.ECHO)
    first = executor.execute("test", "shop-1", GOOD_INPUT)
    second = executor.execute("test", "shop-1", GOOD_INPUT)
    assert (first.report.module_source, second.report.module_source) == ("deserialized", "hot")
    assert executor.cache_stats().hits >= 1


def test_input_as_preserialised_bytes(registry: Registry, executor: Executor) -> None:
    """Host code may pass JSON bytes it already has; they reach stdin unchanged."""
    registry.deploy("test", "shop-1", guests.ECHO)
    result = executor.execute("test", "shop-1", b'{"a": 1}')
    assert result.output == {"a": 1}


def test_input_reaches_the_guest_minified_and_escaped_as_production_writes_it(
    registry: Registry, executor: Executor
) -> None:
    """A WASI guest reads ``/`` as ``\\/`` and U+2028/U+2029 as escapes, in minified JSON."""
    registry.deploy("test", "shop-1", guests.ECHO)
    value = {"url": "https://shop.example/cart", "note": "a\u2028b\u2029c", "n": [1, 2.5]}
    expected = b'{"url":"https:\\/\\/shop.example\\/cart","note":"a\\u2028b\\u2029c","n":[1,2.5]}'
    result = executor.execute("test", "shop-1", value)
    assert result.output == value
    # The echo guest copies stdin to stdout: the bytes it wrote are the bytes it was given.
    assert result.report.input_bytes == result.report.output_bytes == len(expected)


@pytest.mark.parametrize(
    ("module", "code", "detail"),
    [
        (guests.INFINITE_LOOP, "instruction_limit_exceeded", {}),
        (guests.RECURSION, "stack_overflow", {}),
        (guests.MEMORY_BOMB, "memory_limit_exceeded", {}),
        (guests.HUGE_INITIAL_MEMORY, "memory_limit_exceeded", {}),
        (guests.TRAP, "runtime_error", {"trap_code": "unreachable"}),
        (guests.writes(b"{}", exit_code=3), "runtime_error", {"exit_code": 3}),
        (guests.writes(b"this is not json"), "invalid_output", {}),
        (guests.writes(b"\xff\xfe{}"), "invalid_output", {}),
        (guests.writes(b'{"n":NaN}'), "invalid_output", {}),
        (guests.writes(b"[1e999]"), "invalid_output", {}),
        (guests.writes(b"[" * 5000 + b"]" * 5000), "invalid_output", {}),
        (guests.OUTPUT_FLOOD, "output_too_large", {}),
    ],
    ids=[
        "fuel",
        "stack",
        "memory-grow",
        "memory-initial",
        "trap",
        "exit",
        "not-json",
        "not-utf8",
        "nan",
        "past-float64",
        "deep-nesting",
        "flood",
    ],
)
def test_hostile_module_gets_named_error_then_good_script_runs(
    registry: Registry, executor: Executor, module: bytes, code: str, detail: dict[str, object]
) -> None:
    """Each hostile module yields its stable error code, and the process stays healthy."""
    result = deploy_and_run(registry, executor, module)
    assert not result.ok
    assert result.error is not None
    assert result.error.code == code, result.error
    for key, value in detail.items():
        assert result.error.detail[key] == value
    run_good_after(executor, registry)


def test_c_memory_bomb_is_memory_limit_exceeded(registry: Registry, executor: Executor) -> None:
    """A C program that mallocs until NULL and aborts is reported as out of memory."""
    result = deploy_and_run(registry, executor, (EXAMPLES / "hostile" / "memory_bomb.wasm").read_bytes())
    assert result.error is not None and result.error.code == "memory_limit_exceeded"
    assert result.report.peak_memory_bytes <= 10_000 * 1024
    run_good_after(executor, registry)


def test_under_a_small_memory_limit_a_trap_is_a_trap_and_a_bomb_is_out_of_memory(
    registry: Registry, executor: Executor
) -> None:
    """With a 1 MiB memory limit, a one-page guest that traps is a runtime error, not out of
    memory; a guest that grows until refused is still out of memory."""
    registry.define_extension_point("tiny", limits={"memory_bytes": 2**20})
    registry.deploy("tiny", "trap", guests.TRAP)
    registry.deploy("tiny", "bomb", guests.MEMORY_BOMB)
    trap, bomb = executor.execute("tiny", "trap", {}), executor.execute("tiny", "bomb", {})
    assert trap.error is not None and trap.error.code == "runtime_error"
    assert bomb.error is not None and bomb.error.code == "memory_limit_exceeded"


def test_wall_clock_deadline_interrupts_a_guest_with_fuel_to_spare(
    registry: Registry, executor: Executor
) -> None:
    """With a huge instruction budget, the epoch deadline is what stops an endless loop."""
    registry.define_extension_point("slow", limits={"fuel": 10**15, "wall_ms": 30})
    result = deploy_and_run(registry, executor, guests.INFINITE_LOOP, ep="slow")
    assert result.error is not None and result.error.code == "wall_clock_exceeded"
    assert result.report.run_ms < 1000
    run_good_after(executor, registry)


def test_wall_clock_exceeded_reports_the_instructions_it_ran(registry: Registry, executor: Executor) -> None:
    """A script stopped by the wall clock reports how many instructions it ran (a loop that
    calls a function, as real code does; wasmtime flushes the count at calls)."""
    registry.define_extension_point("slow", limits={"fuel": 10**15, "wall_ms": 30})
    looping = guests.wasm(
        """(module (memory (export "memory") 1)
          (func $step (param i32) (result i32) (i32.add (local.get 0) (i32.const 1)))
          (func (export "_start") (local $i i32)
            (loop $l (local.set $i (call $step (local.get $i))) (br $l))))"""
    )
    result = deploy_and_run(registry, executor, looping, ep="slow")
    assert result.error is not None and result.error.code == "wall_clock_exceeded"
    assert result.report.instructions > 1_000_000
    run_good_after(executor, registry)


def test_input_too_large_is_refused_before_running(registry: Registry, executor: Executor) -> None:
    """Input over 128 kB is refused with input_too_large and the script never runs."""
    result = deploy_and_run(registry, executor, guests.ECHO, {"blob": "x" * 140_000})
    assert result.error is not None and result.error.code == "input_too_large"
    assert result.report.instructions == 0
    run_good_after(executor, registry)


def test_input_that_is_not_json_serialisable(registry: Registry, executor: Executor) -> None:
    """Host input that JSON cannot encode gives invalid_input."""
    result = deploy_and_run(registry, executor, guests.ECHO, {"when": object()})
    assert result.error is not None and result.error.code == "invalid_input"


def test_script_not_found(registry: Registry, executor: Executor) -> None:
    """Executing where nothing is deployed gives script_not_found."""
    result = executor.execute("test", "nobody", {})
    assert result.error is not None and result.error.code == "script_not_found"


def test_unknown_extension_point(executor: Executor) -> None:
    """Executing at an undefined extension point gives unknown_extension_point."""
    result = executor.execute("nope", "shop-1", {})
    assert result.error is not None and result.error.code == "unknown_extension_point"


def test_logs_are_truncated_with_a_marker_not_failed(registry: Registry, executor: Executor) -> None:
    """100 KiB of stderr keeps the first 1 kB and says how much was dropped; the run succeeds."""
    result = deploy_and_run(registry, executor, guests.LOG_FLOOD)
    assert result.ok, result.error
    assert result.output == {}
    assert result.report.logs.startswith("\0" * 1024)
    assert f"{100 * 1024 - 1024} bytes dropped" in result.report.logs


def test_clock_and_random_are_fixed_so_runs_replay(registry: Registry, executor: Executor) -> None:
    """The guest sees the fixed clock and the same random bytes on every run."""
    first = deploy_and_run(registry, executor, guests.CLOCK_AND_RANDOM)
    second = executor.execute("test", "shop-1", {})
    assert first.ok and second.ok, (first.error, second.error)
    low, high, *rand = first.output
    assert (high << 32) | low == FIXED_TIME_NS
    assert first.output == second.output
    assert len(set(rand)) > 1


def test_guest_sees_no_environment_files_or_preopens(registry: Registry, executor: Executor) -> None:
    """environ is empty, path_open and fd_prestat_get answer EBADF (8)."""
    result = deploy_and_run(registry, executor, guests.PROBE_HOST)
    assert result.ok, result.error
    assert result.output == [0, 0, 8, 8]


def test_per_extension_point_limit_override(registry: Registry, executor: Executor) -> None:
    """An EP that lowers the output limit applies it to its scripts only."""
    registry.define_extension_point("tiny", limits={"output_bytes": 4})
    registry.deploy("tiny", "s", guests.writes(b'{"abc":1}'))
    registry.deploy("test", "s", guests.writes(b'{"abc":1}'))
    assert executor.execute("tiny", "s", {}).error.code == "output_too_large"  # type: ignore[union-attr]
    assert executor.execute("test", "s", {}).output == {"abc": 1}


def test_output_schema_is_always_enforced(registry: Registry, executor: Executor) -> None:
    """Output from untrusted code that breaks the EP's output schema is invalid_output."""
    registry.define_extension_point(
        "typed", output_schema={"type": "object", "required": ["discounts"]}, input_validation_rate=0.0
    )
    registry.deploy("typed", "s", guests.writes(b'{"other": 1}'))
    result = executor.execute("typed", "s", {})
    assert result.error is not None and result.error.code == "invalid_output"
    assert "discounts" in result.error.message


def test_input_schema_validation_is_sampled(registry: Registry, sandbox, settings) -> None:  # type: ignore[no-untyped-def]
    """At rate 1 bad input is refused; at rate 0 it reaches the script unvalidated."""
    schema = {"type": "object", "required": ["cart"]}
    registry.define_extension_point("always", input_schema=schema, input_validation_rate=1.0)
    registry.define_extension_point("never", input_schema=schema, input_validation_rate=0.0)
    registry.deploy("always", "s", guests.ECHO)
    registry.deploy("never", "s", guests.ECHO)
    executor = Executor(registry, sandbox, settings)
    refused = executor.execute("always", "s", {"nocart": 1})
    assert refused.error is not None and refused.error.code == "invalid_input"
    assert executor.execute("never", "s", {"nocart": 1}).output == {"nocart": 1}
    assert executor.execute("always", "s", {"cart": 1}).output == {"cart": 1}


# -- the fast path: wasmtime internals, cached entry calls, raw host calls, pooled instances ---


def sandbox_run(
    sandbox: Sandbox, module: str | bytes, stdin: bytes = b"{}", export: str = "_start"
) -> SandboxRun:
    """Compile (WAT or Wasm) and run a module on ``sandbox`` with default limits."""
    wasm = guests.wasm(module) if isinstance(module, str) else module
    limits = Limits()
    return sandbox.run(sandbox.compile(wasm, limits.stack_bytes), stdin, limits, export=export)


def test_wasmtime_internals_match_what_the_hot_path_calls() -> None:
    """Guard: the wasmtime-py internals and C prototypes we call directly are what we expect.

    If this fails after a wasmtime upgrade, update engine/_capi.py (and the code that
    calls it) before anything else: Sandbox() refuses to start until it passes.
    """
    assert internals_problems() == []


def test_a_changed_internal_is_reported_and_stops_the_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prototype that no longer matches wasmtime-py's bindings, a C function they no longer
    declare and another major version are each named, and Sandbox() refuses."""
    monkeypatch.setattr(_capi.func_call, "argtypes", _capi.func_call.argtypes[:-1])
    monkeypatch.setitem(_capi.PROTOTYPES, "wasmtime_no_such_function", _capi.func_call)
    monkeypatch.setattr(_capi, "wasmtime_version", lambda: f"{_capi.SUPPORTED_WASMTIME_MAJOR + 1}.0.0")
    problems = internals_problems()
    assert any(p.startswith("wasmtime_func_call:") for p in problems), problems
    assert any("_wasmtime_no_such_function is missing" in p for p in problems), problems
    assert any(p.startswith(f"wasmtime {_capi.SUPPORTED_WASMTIME_MAJOR + 1}.0.0") for p in problems), problems
    with pytest.raises(RuntimeError, match="wasmtime-py internals changed"):
        Sandbox()


def test_cached_entry_call_translates_traps_every_time(sandbox: Sandbox) -> None:
    """The entry's type is checked once per module; later calls still name each trap."""
    limits = Limits(fuel=100_000)
    trap = sandbox.compile(guests.TRAP, limits.stack_bytes)
    loop = sandbox.compile(guests.INFINITE_LOOP, limits.stack_bytes)
    for _ in range(3):
        error = sandbox.run(trap, b"", limits).error
        assert error is not None and (error.code, error.detail) == (
            "runtime_error",
            {"trap_code": "unreachable"},
        )
        error = sandbox.run(loop, b"", limits).error
        assert error is not None and error.code == "instruction_limit_exceeded"


def test_entry_exports_that_cannot_be_called_are_runtime_errors(sandbox: Sandbox) -> None:
    """A missing entry, one that is not a function, and one that takes parameters are named."""
    missing = sandbox_run(sandbox, '(module (memory (export "memory") 1) (func (export "run")))')
    assert missing.error is not None and "no function export '_start'" in missing.error.message
    not_func = sandbox_run(sandbox, '(module (memory (export "_start") 1))')
    assert not_func.error is not None and "no function export '_start'" in not_func.error.message
    params = sandbox_run(sandbox, '(module (func (export "_start") (param i32)))')
    assert params.error is not None and params.error.code == "runtime_error"
    assert "too few parameters provided: given 0, expected 1" in params.error.message
    results = sandbox_run(
        sandbox, '(module (func (export "_start") (result i32 i64) i32.const 1 i64.const 2))'
    )
    assert results.error is None
    named = sandbox_run(sandbox, '(module (func (export "main")))', export="main")
    assert named.error is None


def test_host_call_exceptions_surface_once_and_in_order(sandbox: Sandbox) -> None:
    """proc_exit(0) is success, a negative exit code keeps its sign, a host-raised named error
    wins over the trap it caused, and nothing is left over for the next run."""
    assert sandbox_run(sandbox, guests.writes(b"{}", exit_code=0)).error is None
    exit_neg = sandbox_run(sandbox, guests.writes(b"{}", exit_code=-1)).error
    assert exit_neg is not None and exit_neg.detail == {"exit_code": -1}
    flood = sandbox_run(sandbox, guests.OUTPUT_FLOOD).error
    assert flood is not None and flood.code == "output_too_large"
    after = sandbox_run(sandbox, guests.ECHO, b'{"a": 1}')
    assert (after.error, after.stdout) == (None, b'{"a": 1}')


def test_a_bug_in_a_host_function_propagates_and_the_next_run_is_clean(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception inside a host call is re-raised by run() (never swallowed by the
    ctypes callback), as wasmtime-py's trampoline did; its store is still freed, and the sandbox
    stays usable."""

    def broken(self: object, *args: object) -> None:
        raise ZeroDivisionError("bug in a host function")

    module = sandbox.compile(guests.ECHO, Limits().stack_bytes)
    with monkeypatch.context() as patch:
        patch.setattr(GuestIO, "append_stdout", broken)
        for _ in range(POOL_LIMITS["total_core_instances"] + 1):  # and the store is freed each time
            with pytest.raises(ZeroDivisionError, match="bug in a host function"):
                sandbox.run(module, b"{}", Limits())
    ok = sandbox.run(module, b"{}", Limits())
    assert (ok.error, ok.stdout) == (None, b"{}")


def test_guest_sees_memory_it_grew_between_host_calls(sandbox: Sandbox) -> None:
    """The host's view of guest memory is refreshed when the memory grows."""
    run = sandbox_run(
        sandbox,
        f"""(module
          (import "{guests.WASI}" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "_start")
            (i32.store8 (i32.const 100) (i32.const 123))
            (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 1))
            (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
            (drop (memory.grow (i32.const 3)))
            (i32.store8 (i32.const 200000) (i32.const 125))
            (i32.store (i32.const 0) (i32.const 200000))
            (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))""",
    )
    assert (run.error, run.stdout, run.peak_memory_bytes) == (None, b"{}", 4 * 65536)


def test_runs_never_see_each_others_memory_or_globals(sandbox: Sandbox) -> None:
    """Pooled instance slots are reused (and their first MiB zeroed in place, not unmapped), but
    every run starts from the module's initial state: data image, globals, the rest of memory."""
    module = sandbox.compile(
        guests.wasm(f"""(module
          (import "{guests.WASI}" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (global $g (mut i32) (i32.const 48))
          (data (i32.const 64) "0")
          (func (export "_start")
            (drop (memory.grow (i32.const 1)))
            (i32.store8 (i32.const 65) (global.get $g))
            (i32.store8 (i32.const 66) (i32.add (i32.load8_u (i32.const 100)) (i32.const 48)))
            (i32.store8 (i32.const 67) (i32.add (i32.load8_u (i32.const 70000)) (i32.const 48)))
            (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const 4))
            (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
            (i32.store8 (i32.const 64) (i32.const 57))
            (global.set $g (i32.const 57))
            (i32.store8 (i32.const 100) (i32.const 9))
            (i32.store8 (i32.const 70000) (i32.const 9))))"""),
        Limits().stack_bytes,
    )
    runs = [sandbox.run(module, b"", Limits()) for _ in range(5)]
    # Never "9": neither the data image, the global, written memory nor a grown page carried over.
    assert {run.stdout for run in runs} == {b"0000"}
    assert {run.peak_memory_bytes for run in runs} == {2 * 65536}


@pytest.mark.parametrize(
    "wat",
    [
        '(module (table 1 funcref) (table 1 funcref) (memory (export "memory") 1) (func (export "_start")))',
        '(module (table 100000 funcref) (memory (export "memory") 1) (func (export "_start")))',
        '(module (memory 1) (memory (export "memory") 1) (func (export "_start")))',
    ],
    ids=["two-tables", "big-table", "two-memories"],
)
def test_pooled_engine_runs_modules_the_default_pool_would_refuse(sandbox: Sandbox, wat: str) -> None:
    """wasmtime's default pool limits refuse these; on-demand allocation ran them, and so do we."""
    assert sandbox_run(sandbox, wat).error is None


def test_engine_falls_back_to_on_demand_allocation_without_address_space(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the pool cannot be reserved the engine allocates per instance, and still runs guests."""
    from scriptpool.engine import _engine

    assert _engine._can_reserve(_engine.pool_reservation_bytes())
    assert not _engine._can_reserve(1 << 62)
    monkeypatch.setattr(_engine, "_can_reserve", lambda size: False)
    fallback = Sandbox()
    run = sandbox_run(fallback, guests.ECHO, b"[1]")
    assert (run.error, run.stdout) == (None, b"[1]")


def test_concurrent_runs_on_threads_keep_their_own_io_and_errors(sandbox: Sandbox) -> None:
    """Host-call state is per thread: a flood on one thread never lands on another's run."""
    limits = Limits()
    echo = sandbox.compile(guests.ECHO, limits.stack_bytes)
    flood = sandbox.compile(guests.OUTPUT_FLOOD, limits.stack_bytes)
    failures: list[str] = []

    def work(index: int) -> None:
        for round_ in range(100):
            if index % 2:
                error = sandbox.run(flood, b"", limits).error
                if error is None or error.code != "output_too_large":
                    failures.append(f"flood {index}/{round_}: {error}")
            else:
                payload = f'{{"t": {index}, "r": {round_}}}'.encode()
                run = sandbox.run(echo, payload, limits)
                if run.error is not None or run.stdout != payload:
                    failures.append(f"echo {index}/{round_}: {run.error} {run.stdout[:40]!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_to_dict_is_asdict_without_the_deep_copy(registry: Registry, executor: Executor) -> None:
    """The hand-written wire form has exactly dataclasses.asdict's keys and values."""
    registry.deploy("test", "ok", guests.ECHO)
    registry.deploy("test", "bad", guests.writes(b"{}", b"logs", exit_code=3))
    for execution in (
        executor.execute("test", "ok", {"a": [1, {"b": 2}]}),
        executor.execute("test", "bad", {}),
        executor.execute("test", "nobody", {}),
    ):
        assert execution.to_wire() == dataclasses.asdict(execution)
        assert Execution.from_wire(execution.to_wire()) == execution


def test_record_execution_counts_and_times_every_stage(registry: Registry, executor: Executor) -> None:
    """Metrics from the cached label children land on the documented series."""
    from prometheus_client import REGISTRY

    from scriptpool.workers import _telemetry

    def sample(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    registry.deploy("test", "s", guests.TRAP)
    execution = executor.execute("test", "s", {})
    outcome = {"status": "error", "error_code": "runtime_error"}
    before = sample("scriptpool_executions_total", outcome)
    stages = {s: sample("scriptpool_stage_seconds_count", {"stage": s}) for s in _telemetry._STAGES}
    _telemetry.record_execution(execution, job="j", shop="s", ep="test", shard=0, worker="w")
    _telemetry.record_execution(execution, job="j", shop="s", ep="test", shard=0, worker="w")
    assert sample("scriptpool_executions_total", outcome) == before + 2
    for stage, count in stages.items():
        assert sample("scriptpool_stage_seconds_count", {"stage": stage}) == count + 2


def test_a_dropped_sandbox_stops_its_ticker_without_touching_freed_engines() -> None:
    """Sandboxes come and go (tests, the bench): each one's epoch ticker stops with it, and no
    tick ever reaches an engine being freed (pytest fails the test on any ticker exception)."""
    threads = []
    for _ in range(20):
        created = Sandbox(epoch_tick_ms=1)
        run = sandbox_run(created, guests.ECHO, b"[]")
        assert run.error is None
        thread = created._ticker._thread
        assert thread is not None and thread.is_alive()
        threads.append(thread)
        del created, run
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive()
