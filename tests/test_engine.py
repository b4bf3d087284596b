"""The in-process engine: the ABI, the report, every named error, and recovery after each."""

from __future__ import annotations

import json

import pytest

from registry import Registry
from tests import guests
from tests.conftest import EXAMPLES
from workers import Execution, Executor
from workers.sandbox import FIXED_TIME_NS

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
    assert report.input_bytes == len(json.dumps(payload, separators=(",", ":")).encode())
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
        (guests.OUTPUT_FLOOD, "output_too_large", {}),
    ],
    ids=["fuel", "stack", "memory-grow", "memory-initial", "trap", "exit", "not-json", "not-utf8", "flood"],
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


def test_wall_clock_deadline_interrupts_a_guest_with_fuel_to_spare(
    registry: Registry, executor: Executor
) -> None:
    """With a huge instruction budget, the epoch deadline is what stops an endless loop."""
    registry.define_extension_point("slow", limits={"fuel": 10**15, "wall_ms": 30})
    result = deploy_and_run(registry, executor, guests.INFINITE_LOOP, ep="slow")
    assert result.error is not None and result.error.code == "wall_clock_exceeded"
    assert result.report.run_ms < 1000
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
