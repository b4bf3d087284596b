"""Failures that had no name of their own: GC heap exhaustion, uncaught Wasm exceptions, and
output nested deeper than function-runner's parser takes (which the host then recursed on)."""

from __future__ import annotations

import json

import msgpack
import pytest

from scriptpool.config import Limits
from scriptpool.config.errors import InvalidOutput
from scriptpool.config.wire import MAX_OUTPUT_DEPTH, ExecutionReport
from scriptpool.engine import Sandbox
from scriptpool.producer import Outcome
from scriptpool.runtime._codec import from_json, from_msgpack
from tests import guests

GC_HEAP_BOMB = guests.wasm("""
(module
  (type $bytes (array (mut i8)))
  (type $list (array (mut anyref)))
  (memory (export "memory") 1)
  (func (export "_start") (local $keep (ref $list)) (local $i i32)
    (local.set $keep (array.new_default $list (i32.const 1000)))
    (loop $more
      (array.set $list (local.get $keep) (local.get $i) (array.new_default $bytes (i32.const 65536)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $more))))
""")
GC_HEAP_AT_START = guests.wasm("""
(module
  (type $bytes (array (mut i8)))
  (global $big (ref $bytes) (array.new_default $bytes (i32.const 200000000)))
  (memory (export "memory") 1)
  (func (export "_start")))
""")
UNCAUGHT = guests.wasm(
    '(module (tag $oops) (memory (export "memory") 1) (func (export "_start") (throw $oops)))'
)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("module", [GC_HEAP_BOMB, GC_HEAP_AT_START], ids=["growing", "at-start"])
def test_running_out_of_gc_heap_is_a_memory_limit(sandbox: Sandbox, module: bytes) -> None:
    """GC allocations past the store's memory limit are memory_limit_exceeded (they were
    runtime_error "script failed to start"), and the sandbox runs a good script after."""
    limits = Limits()
    result = sandbox.run(sandbox.compile(module, limits.stack_bytes), b"{}", limits)
    assert result.error is not None
    assert result.error.code == "memory_limit_exceeded"
    assert result.error.detail["trap_code"] == "gc_heap_out_of_memory"
    good = sandbox.run(sandbox.compile(guests.ECHO, limits.stack_bytes), b"[1]", limits)
    assert (good.error, good.stdout) == (None, b"[1]")


def test_an_uncaught_wasm_exception_is_named(sandbox: Sandbox) -> None:
    """A Wasm exception nobody catches is runtime_error with trap code uncaught_exception (it
    was "trapped: unknown")."""
    limits = Limits()
    result = sandbox.run(sandbox.compile(UNCAUGHT, limits.stack_bytes), b"{}", limits)
    assert result.error is not None
    assert (result.error.code, result.error.detail) == ("runtime_error", {"trap_code": "uncaught_exception"})


def test_output_nested_up_to_the_cap_is_accepted() -> None:
    """serde_json's limit: 128 levels of arrays or objects pass, in JSON and MessagePack."""
    assert from_json(nested(MAX_OUTPUT_DEPTH)) == json.loads(nested(MAX_OUTPUT_DEPTH))
    value = json.loads(nested(MAX_OUTPUT_DEPTH))
    assert from_msgpack(msgpack.packb(value)) == value
    mixed = '{"a":' * (MAX_OUTPUT_DEPTH - 1) + "[]" + "}" * (MAX_OUTPUT_DEPTH - 1)
    assert from_json(mixed) == json.loads(mixed)


@pytest.mark.parametrize("depth", [MAX_OUTPUT_DEPTH + 1, 600, 100_000])
def test_output_nested_past_the_cap_is_invalid_output(depth: int) -> None:
    """One level more, the 600 levels that crashed the host, and more than Python's parser
    recurses: each is invalid_output naming the cap."""
    for decode, data in ((from_json, nested(depth)), (from_msgpack, b"\x91" * depth + b"\x90")):
        with pytest.raises(InvalidOutput) as info:
            decode(data)  # type: ignore[operator]
        if depth < 1000:
            assert info.value.detail == {"limit": MAX_OUTPUT_DEPTH}


def test_many_brackets_in_strings_are_not_nesting() -> None:
    """Only arrays and objects count: brackets inside strings are text."""
    text = json.dumps({"note": "[" * 1000 + "{" * 1000})
    assert from_json(text) == json.loads(text)


def test_outcome_to_dict_does_not_recurse_on_script_data() -> None:
    """Outcome.to_dict passes the output through as it is: a reply read back from Redis may
    nest deeper than any cap (it raised RecursionError at 600 levels)."""
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    outcome = Outcome("ok", deep, report=ExecutionReport(instructions=7))
    as_dict = outcome.to_dict()
    assert as_dict["output"] is deep
    assert as_dict["report"]["instructions"] == 7


def test_the_command_line_prints_data_too_deep_to_encode_as_one_named_error() -> None:
    """What the CLI prints may come from Redis (a reply, a captured run): nested past what the
    JSON encoder recurses, it is one invalid_output line, not a traceback."""
    from scriptpool.cli._output import dumps

    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidOutput):
        dumps({"output": deep})
