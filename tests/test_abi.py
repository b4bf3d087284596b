"""The current Shopify ABIs, in process: codec by import, memory-I/O providers, MessagePack over
WASI, the Wasm API trampolined and untrampolined, the report, per-memory limits, and every
hostile provider answered with its named error and the executor healthy right after.

Long on purpose: one section per ABI the pool runs, each test one promise of it, all sharing the
in-process registry and executor fixtures, the ``healthy`` check and the expected API values at
the top; split by ABI, those would be repeated or moved out of sight of the tests that read
them."""

from __future__ import annotations

import json
import math
import time
import tracemalloc

import msgpack
import pytest
import redis
import wasmtime

from scriptpool.config import Limits, Settings
from scriptpool.config.errors import ForbiddenImport, InvalidInput, InvalidModule, InvalidOutput
from scriptpool.engine import (
    CODEC_JSON,
    CODEC_MSGPACK,
    GUEST_MEMORY_MODULE,
    Sandbox,
    codec_for,
    is_memory_io_provider,
)
from scriptpool.engine._guest_io import TRUNCATION_MARKER
from scriptpool.engine._link import GLUE, PROVIDER, resolve
from scriptpool.registry import Registry
from scriptpool.registry._rewrite import linkable, needs_guest_memory
from scriptpool.runtime import Executor, ScriptInput
from scriptpool.runtime._codec import from_msgpack, json_value, to_msgpack
from tests import abi, guests

JAVY_V3 = "shopify_functions_javy_v3"
JAVY_V2 = "shopify_functions_javy_v2"
API_V2 = "shopify_function_v2"
API_INPUT = {"hello": "world!", "n": 21, "arr": [1, 2, 300]}
API_OUTPUT = {"bye": "world!", "n2": 42.0, "len": 3, "nums": [1, 2, 300], "arr": True}
# The provider's 1001-byte log ring keeps the tail of 1025 x "a" then 10 x "b".
API_LOGS = "a" * 991 + "b" * 10


def healthy(registry: Registry, executor: Executor) -> None:
    """The same executor runs a good memory-I/O script and a plain WASI one right after."""
    registry.add_provider(JAVY_V3, abi.wasm("memory_io_provider"))
    registry.deploy("test", "good-mem", abi.wasm("memory_io_echo", JAVY_V3))
    result = executor.execute("test", "good-mem", {"still": ["fine", 1]})
    assert (result.ok, result.output) == (True, {"still": ["fine", 1]}), result.error
    registry.deploy("test", "good-wasi", guests.ECHO)
    result = executor.execute("test", "good-wasi", {"still": "fine"})
    assert (result.ok, result.output) == (True, {"still": "fine"}), result.error


# -- codec by import ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "codec", "memory_io"),
    [
        (None, CODEC_JSON, False),
        ("javy_quickjs_provider_v1", CODEC_JSON, False),
        ("javy_quickjs_provider_v3", CODEC_JSON, False),
        ("shopify_functions_javy_v1", CODEC_JSON, False),
        ("shopify_functions_javy_v2", CODEC_MSGPACK, False),
        ("shopify_functions_javy_v3", CODEC_MSGPACK, True),
        ("shopify_functions_javy_v4", CODEC_MSGPACK, True),
        ("shopify_function_v0.0.1", CODEC_MSGPACK, False),
        ("shopify_function_v1", CODEC_MSGPACK, False),
        ("shopify_function_v2", CODEC_MSGPACK, True),
        ("shopify_function_v3", CODEC_MSGPACK, True),
        ("shopify_functions_javy_vx", CODEC_JSON, False),
    ],
)
def test_codec_and_io_follow_the_import_names(module: str | None, codec: str, memory_io: bool) -> None:
    names = ["wasi_snapshot_preview1"] + ([module] if module else [])
    assert codec_for(names) == codec
    assert is_memory_io_provider(module or "") is memory_io


def test_msgpack_input_is_compact_float64_and_keeps_key_order() -> None:
    """What function-runner sends: ``{"b":1,"a":2}`` is ``82 a1 62 01 a1 61 02``."""
    assert to_msgpack(json_value(b'{"b":1,"a":2}')).hex() == "82a16201a16102"
    value = json_value(b'{"z":[0,-1,127,128,300,-33,65536,4294967296,1.0,1.5,-0.25,1e2],"a":null}')
    packed = to_msgpack(value)
    assert packed == msgpack.packb(value)
    assert packed.hex() == (
        "82a17a9c"
        "00ff7fcc80cd012cd0dfce00010000cf0000000100000000"
        "cb3ff0000000000000cb3ff8000000000000cbbfd0000000000000cb4059000000000000"
        "a161c0"
    )
    # A JSON integer past 64 bits goes as float64, as serde_json reads it.
    assert to_msgpack(json_value(b"[18446744073709551616]")) == msgpack.packb([2.0**64])


def test_msgpack_input_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(InvalidInput):
        json_value(b"[NaN]")
    with pytest.raises(InvalidInput):
        ScriptInput.of({"x": math.inf}).decoded()
    assert ScriptInput.of({1: "int keys become strings, as in JSON"}).decoded().json_value == {
        "1": "int keys become strings, as in JSON"
    }


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # no value at all
        b"\x81\xa1a",  # truncated
        b"\x80\x80",  # trailing bytes
        b"\x81\x01\x02",  # an integer key
        b"\x81\xc4\x01a\x01",  # a binary key
        b"\x91\xc4\x01a",  # a binary value
        b"\x91\xd4\x01\x00",  # an extension value
        b"\x91\xd6\xff\x00\x00\x00\x00",  # a timestamp (extension -1)
        b"\x91\xcb" + b"\x7f\xf8" + b"\0" * 6,  # NaN
        b"\x91\xcb" + b"\x7f\xf0" + b"\0" * 6,  # +infinity
        b"\xa2\xff\xfe",  # a string that is not UTF-8
        b"\xc1",  # the never-used marker
    ],
)
def test_msgpack_output_that_json_cannot_hold_is_invalid_output(raw: bytes) -> None:
    with pytest.raises(InvalidOutput):
        from_msgpack(raw)


def test_msgpack_output_decodes_to_json_values() -> None:
    raw = msgpack.packb({"b": [1, -2, 2**64 - 1, 1.5, None, True, "é"], "a": {}})
    assert from_msgpack(raw) == {"b": [1, -2, 2**64 - 1, 1.5, None, True, "é"], "a": {}}
    assert list(from_msgpack(raw)) == ["b", "a"]


# -- memory-I/O providers -----------------------------------------------------------------------


def test_memory_io_echo_runs_with_msgpack_and_the_providers_report(
    registry: Registry, executor: Executor
) -> None:
    """initialize, the input in the provider's memory, the entry, finalize: output is the
    input, logs are the provider's, and the peak memory is the provider's too."""
    registry.add_provider(JAVY_V3, abi.wasm("memory_io_provider"))
    deployment = registry.deploy("test", "s", abi.wasm("memory_io_echo", JAVY_V3))
    assert deployment.codec == CODEC_MSGPACK
    assert [name for name, _ in deployment.providers] == [JAVY_V3]
    payload = {"b": 1, "a": [1.5, "x", None, {"n": -3}]}
    result = executor.execute("test", "s", payload)
    assert result.ok, result.error
    assert result.output == payload and list(result.output) == ["b", "a"]
    report = result.report
    assert report.codec == CODEC_MSGPACK
    assert report.input_bytes == report.output_bytes == len(msgpack.packb(payload))
    assert report.logs == "echo\n"
    assert report.peak_memory_bytes == 65536  # the provider's one page (the guest's own is one too)
    assert 0 < report.instructions < 10_000
    assert executor.execute("test", "s", {}).report.logs == "echo\nempty\n"


def hostile_provider(
    initialize: str = "(i32.const 0x3000)",
    results: tuple[int, int, int, int, int, int] = (0x1000, 1, 0, 0, 0, 0),
    finalize: str = "(i32.const 0x100)",
    output: bytes = b"\x80",
    pages: int = 1,
    extra: str = "",
) -> bytes:
    """A memory-I/O provider whose initialize and finalize return what the test says; the six
    words at 0x100 are ``results``, ``output`` sits at 0x1000 (by default a one-byte empty map)
    and the input goes to 0x3000."""
    stores = " ".join(
        f"(i32.store (i32.const {0x100 + 4 * i}) (i32.const {v}))" for i, v in enumerate(results)
    )
    data = "".join(f"\\{b:02x}" for b in output)
    return guests.wasm(f"""
    (module (memory (export "memory") {pages})
      (data (i32.const 0x1000) "{data}")
      (data (i32.const 0x2000) "first segment, second segment")
      (func (export "initialize") (param $len i32) (result i32) {initialize})
      (func (export "finalize") (result i32) {stores} {finalize})
      {extra})
    """)


# A memory-I/O guest that does nothing: all it links is the provider's memory.
IDLE_GUEST = guests.wasm(f'(module (import "{JAVY_V3}" "memory" (memory 1)) (func (export "_start")))')

LOOP = (
    "(local $i i32) (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1)))"
    " (br_if $l (i32.lt_u (local.get $i) (i32.const 1000000))))"
)


def run_with(registry: Registry, executor: Executor, provider: bytes, payload: object = None) -> object:
    registry.add_provider(JAVY_V3, provider)
    registry.deploy("test", "s", IDLE_GUEST)
    return executor.execute("test", "s", {} if payload is None else payload)


def test_logs_are_the_two_segments_concatenated(registry: Registry, executor: Executor) -> None:
    result = run_with(registry, executor, hostile_provider(results=(0x1000, 1, 0x2000, 15, 0x200F, 14)))
    assert result.ok, result.error  # type: ignore[attr-defined]
    assert result.report.logs == "first segment, second segment"  # type: ignore[attr-defined]
    assert result.output == {}  # type: ignore[attr-defined]


def test_logs_past_the_log_limit_are_truncated_with_our_marker(
    registry: Registry, executor: Executor
) -> None:
    registry.define_extension_point("test", limits={"log_bytes": 20})
    result = run_with(registry, executor, hostile_provider(results=(0x1000, 1, 0x2000, 15, 0x200F, 14)))
    assert result.ok, result.error  # type: ignore[attr-defined]
    assert result.report.logs == "first segment, secon" + TRUNCATION_MARKER.format(dropped=9)  # type: ignore[attr-defined]


def test_initialize_and_finalize_are_not_the_scripts_instructions(
    registry: Registry, executor: Executor
) -> None:
    """A provider that spends a million iterations in each still fits a 50,000 fuel budget,
    and none of it is reported."""
    registry.define_extension_point("test", limits={"fuel": 50_000})
    provider = guests.wasm(f"""
    (module (memory (export "memory") 1)
      (data (i32.const 0x1000) "\\80")
      (func $spin {LOOP})
      (func (export "initialize") (param i32) (result i32) (call $spin) (i32.const 0x1000))
      (func (export "finalize") (result i32)
        (call $spin)
        (i32.store (i32.const 0x100) (i32.const 0x1000)) (i32.store (i32.const 0x104) (i32.const 1))
        (i32.const 0x100)))""")
    result = run_with(registry, executor, provider)
    assert result.ok, result.error  # type: ignore[attr-defined]
    assert result.report.instructions < 100  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("provider", "code", "detail"),
    [
        (
            hostile_provider(initialize="unreachable"),
            "runtime_error",
            {"trap_code": "unreachable", "stage": "initialize"},
        ),
        (
            hostile_provider(finalize="unreachable"),
            "runtime_error",
            {"trap_code": "unreachable", "stage": "finalize"},
        ),
        (hostile_provider(initialize="(i32.const 0x10000)"), "invalid_output", {"stage": "initialize"}),
        (hostile_provider(initialize="(i32.const -1)"), "invalid_output", {"stage": "initialize"}),
        (hostile_provider(finalize="(i32.const 0x10000)"), "invalid_output", {"stage": "finalize"}),
        (hostile_provider(finalize="(i32.const 0xFFF0)"), "invalid_output", {"stage": "finalize"}),
        (hostile_provider(finalize="(i32.const -8)"), "invalid_output", {"stage": "finalize"}),
        (hostile_provider(results=(0x1000, 0xFFFFFFF0, 0, 0, 0, 0)), "invalid_output", {"stage": "finalize"}),
        (hostile_provider(results=(0xFFFFFFFF, 2, 0, 0, 0, 0)), "invalid_output", {"stage": "finalize"}),
        (hostile_provider(results=(0xFFF0, 0x20, 0, 0, 0, 0)), "invalid_output", {"stage": "finalize"}),
        (
            hostile_provider(results=(0x1000, 1, 0x2000, 0xFFFFFFFF, 0, 0)),
            "invalid_output",
            {"stage": "finalize"},
        ),
        (hostile_provider(results=(0x1000, 1, 0, 0, 0x10000, 1)), "invalid_output", {"stage": "finalize"}),
        (hostile_provider(output=b"\x81\xa1a"), "invalid_output", {}),  # not MessagePack
        (hostile_provider(output=b"\x80\x80", results=(0x1000, 2, 0, 0, 0, 0)), "invalid_output", {}),
        (hostile_provider(results=(0x1000, 0, 0, 0, 0, 0)), "invalid_output", {}),  # no output at all
        (hostile_provider(results=(0, 30000, 0, 0, 0, 0)), "output_too_large", {"stage": "finalize"}),
    ],
    ids=[
        "initialize-traps",
        "finalize-traps",
        "input-buffer-past-memory",
        "input-buffer-at-4GiB",
        "results-block-past-memory",
        "results-block-straddles-the-end",
        "results-block-at-4GiB",
        "output-length-near-4GiB",
        "output-pointer-at-4GiB",
        "output-straddles-the-end",
        "log-length-near-4GiB",
        "second-log-segment-past-memory",
        "output-not-msgpack",
        "output-trailing-bytes",
        "output-empty",
        "output-past-the-output-limit",
    ],
)
def test_hostile_memory_io_providers_get_their_named_error(
    registry: Registry, executor: Executor, provider: bytes, code: str, detail: dict[str, str]
) -> None:
    result = run_with(registry, executor, provider)
    assert result.error is not None, result.output  # type: ignore[attr-defined]
    assert result.error.code == code  # type: ignore[attr-defined]
    assert detail.items() <= result.error.detail.items()  # type: ignore[attr-defined]
    healthy(registry, executor)


def test_finalize_copies_no_more_than_the_room_under_the_limits(
    registry: Registry, executor: Executor
) -> None:
    """A provider naming 9 MB of logs and 9 MB of output in its 9.8 MB memory: the host copies
    the log limit's worth of logs and none of the output (output_too_large), where it copied
    all 18 MB before applying the limits."""
    provider = hostile_provider(results=(0, 9_000_000, 0, 9_000_000, 0, 0), pages=150)
    tracemalloc.start()
    try:
        result = run_with(registry, executor, provider)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.error is not None  # type: ignore[attr-defined]
    assert result.error.code == "output_too_large"  # type: ignore[attr-defined]
    assert result.error.detail["stage"] == "finalize"  # type: ignore[attr-defined]
    assert peak < 2 << 20
    healthy(registry, executor)


@pytest.mark.parametrize("stage", ["initialize", "finalize"])
def test_a_provider_that_never_returns_is_held_to_the_scripts_own_limits(
    registry: Registry, executor: Executor, stage: str
) -> None:
    """A provider's own work is not counted as the script's, but each of its stages gets no
    more than the script's wall clock, so a provider looping forever costs the worker
    what the script's wall clock allows (it was a fixed 10 s backstop)."""
    loop = "(loop $l (br $l)) (i32.const 0)"
    started = time.perf_counter()
    result = run_with(registry, executor, hostile_provider(**{stage: loop}))
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert result.error is not None  # type: ignore[attr-defined]
    assert result.error.code == "wall_clock_exceeded"  # type: ignore[attr-defined]
    assert result.error.detail["stage"] == stage  # type: ignore[attr-defined]
    limits = Limits()  # the test EP's
    # Three stages at most, each within its wall limit (and one epoch tick): far below 10 s.
    assert elapsed_ms < 3 * (limits.wall_ms + 50) + 1000
    healthy(registry, executor)


def test_a_guest_that_traps_still_gets_its_logs(registry: Registry, executor: Executor) -> None:
    """finalize runs after a failed entry too, so the logs written before the trap are kept."""
    registry.add_provider(JAVY_V3, hostile_provider(results=(0x1000, 1, 0x2000, 13, 0, 0)))
    registry.deploy(
        "test",
        "s",
        guests.wasm(
            f'(module (import "{JAVY_V3}" "memory" (memory 1)) (func (export "_start") unreachable))'
        ),
    )
    result = executor.execute("test", "s", {})
    assert result.error is not None and result.error.code == "runtime_error"
    assert result.error.detail == {"trap_code": "unreachable"}
    assert result.report.logs == "first segment"


def test_memory_io_and_wasi_in_one_module_is_refused_at_deploy(registry: Registry) -> None:
    """function-runner's rule: a memory-I/O provider's module may not import WASI."""
    both = guests.wasm(f"""
    (module
      (import "{API_V2}" "shopify_function_input_get" (func (result i64)))
      (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1) (func (export "_start")))""")
    with pytest.raises(ForbiddenImport) as info:
        registry.deploy("test", "s", both)  # refused whether or not the provider is installed
    assert info.value.code == "forbidden_import"
    assert f"cannot use `{API_V2}` and import WASI" in info.value.message
    registry.add_provider(API_V2, abi.wasm("wasm_api_provider"))
    with pytest.raises(ForbiddenImport):
        registry.deploy("test", "s", both)


def test_a_memory_io_module_imports_from_its_provider_only(registry: Registry) -> None:
    registry.add_provider(JAVY_V3, abi.wasm("memory_io_provider"))
    registry.add_provider("answers_v1", guests.PROVIDER)
    mixed = guests.wasm(f"""
    (module (import "{JAVY_V3}" "memory" (memory 1)) (import "answers_v1" "answer" (func (result i32)))
      (func (export "_start")))""")
    with pytest.raises(ForbiddenImport):
        registry.deploy("test", "s", mixed)


@pytest.mark.parametrize(
    "provider",
    [
        guests.PROVIDER,  # no initialize, no finalize
        guests.wasm(
            '(module (import "wasi_snapshot_preview1" "sched_yield" (func (result i32)))'
            '(memory (export "memory") 1)'
            '(func (export "initialize") (param i32) (result i32) (i32.const 0))'
            '(func (export "finalize") (result i32) (i32.const 0)))'
        ),  # imports WASI
        guests.wasm(
            '(module (memory (export "mem") 1)'
            '(func (export "initialize") (param i32) (result i32) (i32.const 0))'
            '(func (export "finalize") (result i32) (i32.const 0)))'
        ),  # no memory export named memory
        guests.wasm(
            '(module (memory (export "memory") 1)'
            '(func (export "initialize") (param i64) (result i32) (i32.const 0))'
            '(func (export "finalize") (result i32) (i32.const 0)))'
        ),  # initialize of the wrong type
    ],
    ids=["no-initialize", "imports-wasi", "no-memory-export", "wrong-initialize-type"],
)
def test_a_memory_io_provider_must_speak_memory_io(registry: Registry, provider: bytes) -> None:
    with pytest.raises(InvalidModule):
        registry.add_provider(JAVY_V3, provider)


# -- per-memory limits --------------------------------------------------------------------------


def growing(pages_provider: int, pages_guest: int) -> tuple[bytes, bytes]:
    """A provider and its guest that grow their own memories one page at a time, by these many
    pages, and trap when a page is refused (as an allocator aborts)."""
    grow = (
        "(local $i i32) (loop $l"
        " (if (i32.eq (memory.grow {memory} (i32.const 1)) (i32.const -1)) (then unreachable))"
        " (local.set $i (i32.add (local.get $i) (i32.const 1)))"
        " (br_if $l (i32.lt_u (local.get $i) (i32.const {n}))))"
    )
    provider = guests.wasm(f"""
    (module (memory (export "memory") 1)
      (data (i32.const 0x1000) "\\80")
      (func (export "initialize") (param i32) (result i32) (i32.const 0x2000))
      (func (export "grow") {grow.format(memory="", n=pages_provider)})
      (func (export "finalize") (result i32)
        (i32.store (i32.const 0x100) (i32.const 0x1000)) (i32.store (i32.const 0x104) (i32.const 1))
        (i32.const 0x100)))""")
    guest = guests.wasm(f"""
    (module (import "{JAVY_V3}" "memory" (memory 1)) (import "{JAVY_V3}" "grow" (func $grow))
      (memory $own (export "own") 1)
      (func $own_grow {grow.format(memory="$own", n=pages_guest)})
      (func (export "_start") (call $grow) (call $own_grow)))""")
    return provider, guest


@pytest.mark.parametrize(
    ("provider_pages", "guest_pages", "code"),
    [(11, 11, None), (20, 1, "memory_limit_exceeded"), (1, 20, "memory_limit_exceeded")],
    ids=["each-under-the-limit", "provider-over", "guest-over"],
)
def test_the_memory_limit_holds_for_each_memory(
    registry: Registry, executor: Executor, provider_pages: int, guest_pages: int, code: str | None
) -> None:
    """Under a 1 MiB limit, the provider and the guest may each grow to 12 pages (1.5 MiB in
    all); either one past 16 pages is out of memory. The peak is the larger of the two."""
    registry.define_extension_point("test", limits={"memory_bytes": 16 * 65536})
    provider, guest = growing(provider_pages, guest_pages)
    registry.add_provider(JAVY_V3, provider)
    registry.deploy("test", "s", guest)
    result = executor.execute("test", "s", {})
    if code is None:
        assert result.ok, result.error
        assert result.report.peak_memory_bytes == 12 * 65536
    else:
        assert result.error is not None and result.error.code == code
    healthy(registry, executor)


def test_a_provider_declaring_too_much_memory_is_out_of_memory(
    registry: Registry, executor: Executor
) -> None:
    registry.define_extension_point("test", limits={"memory_bytes": 16 * 65536})
    result = run_with(registry, executor, hostile_provider(pages=17))
    assert result.error is not None and result.error.code == "memory_limit_exceeded"  # type: ignore[attr-defined]
    assert result.error.detail["stage"] == "instantiate"  # type: ignore[attr-defined]
    healthy(registry, executor)


# -- MessagePack over WASI (shopify_functions_javy_v2) ------------------------------------------


def test_javy_v2_style_provider_reads_and_writes_msgpack_on_stdio(
    registry: Registry, executor: Executor
) -> None:
    """A WASI provider linked as before, MessagePack on stdin and stdout; the module's entry is
    its `run` export."""
    registry.add_provider(JAVY_V2, abi.wasm("wasi_msgpack_provider"))
    module = abi.wasm("wasi_msgpack_echo", JAVY_V2)
    deployment = registry.deploy("test", "s", module, export="run")
    assert deployment.codec == CODEC_MSGPACK
    result = executor.execute("test", "s", {"b": 1, "a": 2})
    assert result.ok, result.error
    assert result.output == {"b": 1, "a": 2} and list(result.output) == ["b", "a"]
    assert (result.report.input_bytes, result.report.output_bytes) == (7, 7)  # 82 a1 62 01 a1 61 02
    assert result.report.logs == "echo\n"
    assert result.report.peak_memory_bytes == 2 * 65536  # the provider's two pages
    assert result.report.codec == CODEC_MSGPACK
    registry.deploy("test", "start", module)  # `_start` only evaluates: no output, not MessagePack
    assert executor.execute("test", "start", {}).error.code == "invalid_output"  # type: ignore[union-attr]


def test_the_raw_msgpack_bytes_a_wasi_provider_sees(sandbox: Sandbox, settings: Settings) -> None:
    from scriptpool.config import Limits

    limits = Limits()
    provider = sandbox.compile(abi.wasm("wasi_msgpack_provider"), limits.stack_bytes)
    module = sandbox.compile(abi.wasm("wasi_msgpack_echo", JAVY_V2), limits.stack_bytes)
    stdin = to_msgpack(json_value(b'{"b":1,"a":2}'))
    run = sandbox.run(module, stdin, limits, export="run", providers={JAVY_V2: provider})
    assert run.error is None
    assert run.stdout.hex() == "82a16201a16102"


def test_json_provider_modules_report_the_providers_memory(registry: Registry, executor: Executor) -> None:
    """A JSON module linked to a WASI provider (javy_quickjs_provider_v1, say) that has no memory
    of its own reports the provider's, not 0."""
    registry.add_provider("answers_v1", guests.PROVIDER)
    module = guests.wasm("""
    (module (import "answers_v1" "memory" (memory 1))
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (export "memory" (memory 0))  ;; WASI calls write through the caller's exported memory
      (func (export "_start")))""")
    registry.deploy("test", "s", module)
    result = executor.execute("test", "s", {})
    assert result.report.peak_memory_bytes == 65536
    assert result.report.codec == CODEC_JSON


# -- the Wasm API -------------------------------------------------------------------------------


@pytest.mark.parametrize("guest", ["wasm_api_trampolined", "wasm_api_untrampolined"])
def test_wasm_api_guests_run_against_our_provider(registry: Registry, executor: Executor, guest: str) -> None:
    registry.add_provider(API_V2, abi.wasm("wasm_api_provider"))
    deployment = registry.deploy("test", "s", abi.wasm(guest))
    assert deployment.codec == CODEC_MSGPACK
    result = executor.execute("test", "s", API_INPUT)
    assert result.ok, result.error
    assert result.output == API_OUTPUT and list(result.output) == list(API_OUTPUT)
    assert result.report.logs == API_LOGS
    assert result.report.peak_memory_bytes == 65536
    assert result.report.instructions > 0
    long = "é" * 10_000  # 20,000 bytes: past the 16,383 a NaN box holds, so the guest asks
    assert executor.execute("test", "s", {**API_INPUT, "hello": long}).output["bye"] == long  # type: ignore[index]
    healthy(registry, executor)


def test_a_clang_built_untrampolined_guest_runs(registry: Registry, executor: Executor) -> None:
    """A C guest as clang emits it (shadow stack, data segments, its memory exported) links
    through the deploy-time rewrite and the glue."""
    registry.add_provider(API_V2, abi.wasm("wasm_api_provider"))
    registry.deploy("test", "s", (abi.HERE / "wasm_api_guest.wasm").read_bytes())
    lines = [{"title": "Socks", "quantity": 2}, {"title": "Ünïcode hat", "quantity": 1.5}]
    result = executor.execute("test", "s", {"cart": {"lines": lines}})
    assert result.ok, result.error
    assert result.output == {
        "titles": ["Socks", "Ünïcode hat"],
        "total_quantity": 3.5,
        "note": "built with clang",
    }
    assert result.report.logs == "lines: 2\n"
    big = [{"title": "x" * 20_000, "quantity": 1}]  # past what a NaN box's length holds
    assert executor.execute("test", "s", {"cart": {"lines": big}}).output["titles"] == ["x" * 20_000]  # type: ignore[index]


def test_untrampolined_numeric_functions_link_straight_to_the_provider(sandbox: Sandbox) -> None:
    """Numeric functions resolve to the provider's `_`-prefixed exports; string functions and
    the guest memory to the glue module."""
    stack = 512 * 1024
    provider = sandbox.compile(abi.wasm("wasm_api_provider"), stack)
    module = sandbox.compile(linkable(abi.wasm("wasm_api_untrampolined")), stack)
    resolution = resolve(module, {API_V2: provider})
    by_name = {imp.name: source for imp, source in zip(module.imports, resolution.sources, strict=True)}
    assert by_name["shopify_function_input_get"].kind == PROVIDER
    assert by_name["shopify_function_input_get"].name == "_shopify_function_input_get"
    assert by_name["shopify_function_output_new_f64"].name == "_shopify_function_output_new_f64"
    assert {n for n, s in by_name.items() if s.kind == GLUE} == {
        "shopify_function_input_get_obj_prop",
        "shopify_function_input_read_utf8_str",
        "shopify_function_output_new_utf8_str",
        "shopify_function_intern_utf8_str",
        "shopify_function_log_new_utf8_str",
        "memory",  # the guest memory, which the glue defines
    }
    assert resolution.memory_io == API_V2


def test_the_rewrite_turns_the_memory_definition_into_an_import(sandbox: Sandbox) -> None:
    original = abi.wasm("wasm_api_untrampolined")
    assert needs_guest_memory(original)
    rewritten = linkable(original)
    assert linkable(rewritten) == rewritten and not needs_guest_memory(rewritten)
    before, after = (sandbox.compile(w, 512 * 1024) for w in (original, rewritten))
    assert [(i.module, i.name) for i in after.imports] == [
        *((i.module, i.name) for i in before.imports),
        (GUEST_MEMORY_MODULE, "memory"),
    ]
    memory = after.imports[-1].type
    assert isinstance(memory, wasmtime.MemoryType) and (memory.limits.min, memory.limits.max) == (1, None)
    assert [e.name for e in after.exports] == [e.name for e in before.exports]  # memory still exported
    trampolined = abi.wasm("wasm_api_trampolined")
    assert linkable(trampolined) is trampolined  # nothing to rewrite
    assert linkable(guests.ECHO) is guests.ECHO


def test_the_stored_module_is_the_deployed_one_and_a_recompile_links_too(
    registry: Registry, executor: Executor, redis_client: redis.Redis, settings: Settings
) -> None:
    """The registry keeps the bytes as deployed (their hash is the report's); a worker without
    an artifact for its engine compiles them with the same rewrite."""
    import hashlib

    registry.add_provider(API_V2, abi.wasm("wasm_api_provider"))
    original = abi.wasm("wasm_api_untrampolined")
    deployment = registry.deploy("test", "s", original)
    assert deployment.sha256 == hashlib.sha256(original).hexdigest()
    assert registry.module_bytes(deployment.sha256) == original
    redis_client.delete(settings.keys.artifact(registry.fingerprint, deployment.sha256))
    result = executor.execute("test", "s", API_INPUT)
    assert result.ok, result.error
    assert (result.output, result.report.module_source) == (API_OUTPUT, "compiled")


def untrampolined(imports: str, body: str, memory: str = '(memory (export "memory") 1)') -> bytes:
    return guests.wasm(f'(module {imports} {memory} (func (export "_start") {body}))')


NEW_STR = f'(import "{API_V2}" "shopify_function_output_new_utf8_str" (func $s (param i32 i32) (result i32)))'


@pytest.mark.parametrize(
    ("module", "error"),
    [
        (untrampolined(f'(import "{API_V2}" "shopify_function_nope" (func))', ""), ForbiddenImport),
        (  # the context-based signature (v0.0.1 and early v1): must be trampolined
            untrampolined(
                f'(import "{API_V2}" "shopify_function_output_new_utf8_str"'
                " (func (param i32 i32 i32) (result i32)))",
                "",
            ),
            ForbiddenImport,
        ),
        (untrampolined(NEW_STR, "", memory=""), InvalidModule),  # no memory of its own
        (untrampolined(NEW_STR, "", memory="(memory 1) (memory 1)"), InvalidModule),  # two
        (  # the provider's memory imported beside the string functions
            untrampolined(NEW_STR + f'(import "{API_V2}" "memory" (memory 1))', "", memory="(memory 1)"),
            InvalidModule,
        ),
        (
            untrampolined(f'(import "{GUEST_MEMORY_MODULE}" "memory" (memory 1))', "", memory=""),
            ForbiddenImport,
        ),
    ],
    ids=[
        "unknown-function",
        "context-signature",
        "no-memory",
        "two-memories",
        "provider-memory",
        "guest-memory-alone",
    ],
)
def test_untrampolined_modules_that_cannot_link_are_refused(
    registry: Registry, module: bytes, error: type[Exception]
) -> None:
    registry.add_provider(API_V2, abi.wasm("wasm_api_provider"))
    with pytest.raises(error):
        registry.deploy("test", "s", module)


def test_glue_needs_the_providers_functions(registry: Registry) -> None:
    """A provider without `_shopify_function_alloc` cannot back get_obj_prop's glue."""
    text = abi.wat("wasm_api_provider").replace('(export "_shopify_function_alloc")', "")
    registry.add_provider(API_V2, guests.wasm(text))
    get_prop = (
        f'(import "{API_V2}" "shopify_function_input_get_obj_prop" (func (param i64 i32 i32) (result i64)))'
    )
    with pytest.raises(ForbiddenImport):
        registry.deploy("test", "s", untrampolined(get_prop, ""))
    registry.deploy("test", "s", untrampolined(NEW_STR, ""))  # output_new_utf8_str needs no alloc


@pytest.mark.parametrize(
    ("body", "trap"),
    [
        (
            "(drop (call $s (i32.const 0xFFFF) (i32.const 16)))",
            "memory_out_of_bounds",
        ),  # past the guest's page
        # a length of 4 GiB: the provider traps on it
        ("(drop (call $s (i32.const 0) (i32.const -1)))", "memory_out_of_bounds"),
    ],
    ids=["guest-pointer-out-of-bounds", "length-near-4GiB"],
)
def test_glue_with_bad_guest_pointers_traps_and_the_executor_stays_healthy(
    registry: Registry, executor: Executor, body: str, trap: str
) -> None:
    registry.add_provider(API_V2, abi.wasm("wasm_api_provider"))
    registry.deploy("test", "s", untrampolined(NEW_STR, body))
    result = executor.execute("test", "s", {})
    assert result.error is not None
    assert result.error.code in ("runtime_error", "memory_limit_exceeded")
    assert result.error.detail.get("trap_code") == trap
    healthy(registry, executor)


def test_a_failed_string_write_copies_nothing(registry: Registry, executor: Executor) -> None:
    """The trampoline's glue copies a failed write's bytes to the pointer the provider answered
    (address 0 from Shopify's provider); ours checks the status first. Here a failed write
    answers the log ring's address, so a stray copy would show in the logs."""
    text = abi.wat("wasm_api_provider")
    failed = "(return (i64.shl (i64.extend_i32_u (local.get $r)) (i64.const 32)))"
    assert failed in text
    text = text.replace(failed, f"(return (i64.or {failed[8:-1]} (i64.const 0x200)))")
    registry.add_provider(API_V2, guests.wasm(text))
    log = f'(import "{API_V2}" "shopify_function_log_new_utf8_str" (func $log (param i32 i32)))'
    null = f'(import "{API_V2}" "shopify_function_output_new_null" (func $n (result i32)))'
    guest = untrampolined(
        NEW_STR + log + null,
        """(call $log (i32.const 0) (i32.const 4))
        (if (call $n) (then unreachable))
        (if (i32.ne (call $s (i32.const 4) (i32.const 4)) (i32.const 4)) (then unreachable))""",
        memory='(memory (export "memory") 1) (data (i32.const 0) "logsoops")',
    )
    registry.deploy("test", "s", guest)
    result = executor.execute("test", "s", {})
    assert result.ok, result.error
    assert (result.output, result.report.logs) == (None, "logs")


def test_json_value_round_trip_through_a_wasm_api_guest_keeps_types(
    registry: Registry, executor: Executor
) -> None:
    registry.add_provider(API_V2, abi.wasm("wasm_api_provider"))
    registry.deploy("test", "s", abi.wasm("wasm_api_untrampolined"))
    result = executor.execute("test", "s", json.dumps({**API_INPUT, "n": 0.25}).encode())
    assert result.ok, result.error
    assert result.output["n2"] == 0.5  # type: ignore[index]


# -- the Wasm API, v1 ---------------------------------------------------------------------------

API_V1 = "shopify_function_v1"


def v1_provider() -> bytes:
    """Our provider as a v1 one: a WASI provider that reads its MessagePack input on stdin in
    context_new and writes its output on stdout in output_finalize, with v1's realloc."""
    text = abi.wat("wasm_api_provider")
    text = text.replace('(func (export "initialize")', "(func $initialize")
    text = text.replace('(func (export "finalize")', "(func $finalize")
    wasi = f"""
  (import "{guests.WASI}" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "{guests.WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (func (export "_shopify_function_context_new") (result i32) (local $n i32) (local $total i32)
    (drop (call $initialize (i32.const 61440)))
    (block $done (loop $more
      (i32.store (i32.const 0x20) (i32.add (global.get $in_ptr) (local.get $total)))
      (i32.store (i32.const 0x24) (i32.sub (i32.const 61440) (local.get $total)))
      (drop (call $fd_read (i32.const 0) (i32.const 0x20) (i32.const 1) (i32.const 0x28)))
      (local.set $n (i32.load (i32.const 0x28)))
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $total (i32.add (local.get $total) (local.get $n)))
      (br $more)))
    (global.set $in_len (local.get $total))
    (i32.const 0))
  (func (export "_shopify_function_output_finalize") (result i32)
    (if (i32.ne (global.get $st_kind) (i32.const 3)) (then (return (i32.const 6))))  ;; ValueNotFinished
    (i32.store (i32.const 0x20) (global.get $out_ptr))
    (i32.store (i32.const 0x24) (global.get $out_len))
    (drop (call $fd_write (i32.const 1) (i32.const 0x20) (i32.const 1) (i32.const 0x28)))
    (i32.const 0))
  (func (export "shopify_function_realloc") (param i32 i32 i32 i32) (result i32) (call $alloc (local.get 3)))
"""
    return guests.wasm(text.replace("(module", "(module" + wasi, 1))


V1_GUEST = f"""
(module
  (import "{API_V1}" "shopify_function_context_new" (func $context_new (result i32)))
  (import "{API_V1}" "shopify_function_input_get" (func $input_get (result i64)))
  (import "{API_V1}" "shopify_function_input_get_obj_prop"
    (func $get_obj_prop (param i64 i32 i32) (result i64)))
  (import "{API_V1}" "shopify_function_input_read_utf8_str" (func $read_utf8_str (param i32 i32 i32)))
  (import "{API_V1}" "shopify_function_output_new_object" (func $new_object (param i32) (result i32)))
  (import "{API_V1}" "shopify_function_output_new_utf8_str" (func $new_str (param i32 i32) (result i32)))
  (import "{API_V1}" "shopify_function_output_finish_object" (func $finish_object (result i32)))
  (import "{API_V1}" "shopify_function_output_finalize" (func $finalize (result i32)))
  (import "{guests.WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "hello\\00\\00\\00bye\\00v1 log\\n")
  (func $check (param i32) (if (local.get 0) (then unreachable)))
  (func (export "_start") (local $hello i64) (local $len i32)
    (drop (call $context_new))
    (local.set $hello (call $get_obj_prop (call $input_get) (i32.const 0) (i32.const 5)))
    (local.set $len (i32.wrap_i64 (i64.and (i64.shr_u (local.get $hello) (i64.const 32)) (i64.const 0x3FFF))))
    (call $read_utf8_str (i32.wrap_i64 (local.get $hello)) (i32.const 0x1000) (local.get $len))
    (call $check (call $new_object (i32.const 1)))
    (call $check (call $new_str (i32.const 8) (i32.const 3)))
    (call $check (call $new_str (i32.const 0x1000) (local.get $len)))
    (call $check (call $finish_object))
    (call $check (call $finalize))
    (i32.store (i32.const 0x100) (i32.const 12))
    (i32.store (i32.const 0x104) (i32.const 7))
    (drop (call $fd_write (i32.const 2) (i32.const 0x100) (i32.const 1) (i32.const 0x108)))))
"""


def test_untrampolined_v1_module_links_to_a_wasi_provider(registry: Registry, executor: Executor) -> None:
    """v1 is a WASI provider: MessagePack on stdio, logs on stderr; its untrampolined string
    functions get the same glue, allocating with v1's realloc."""
    registry.add_provider(API_V1, v1_provider())
    deployment = registry.deploy("test", "s", guests.wasm(V1_GUEST))
    assert deployment.codec == CODEC_MSGPACK
    result = executor.execute("test", "s", {"hello": "world!"})
    assert result.ok, result.error
    assert result.output == {"bye": "world!"}
    assert result.report.logs == "v1 log\n"
    assert result.report.peak_memory_bytes == 2 * 65536  # the provider's, grown for the input
    healthy(registry, executor)


def test_a_provider_linked_module_with_many_wasi_imports(registry: Registry, executor: Executor) -> None:
    """Past a few WASI imports the run's linker starts as a clone of the engine's: the same
    functions either way (fixed clock, fixed random)."""
    registry.add_provider(JAVY_V2, abi.wasm("wasi_msgpack_provider"))
    names = ["sched_yield", "args_sizes_get", "environ_sizes_get", "clock_res_get", "random_get"]
    for count in (1, len(names)):
        imports = " ".join(
            f'(import "{guests.WASI}" "{n}" (func ${n} (param {" ".join(guests.provided_signatures()[n][0])})'
            " (result i32)))"
            for n in names[:count]
        )
        module = guests.wasm(f"""
        (module {imports}
          (import "{guests.WASI}" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
          (import "{JAVY_V2}" "memory" (memory 1))
          (export "memory" (memory 0))
          (func (export "_start")
            (i32.store8 (i32.const 0x100) (i32.const 0xc3))  ;; MessagePack true
            (i32.store (i32.const 0x110) (i32.const 0x100)) (i32.store (i32.const 0x114) (i32.const 1))
            (drop (call $w (i32.const 1) (i32.const 0x110) (i32.const 1) (i32.const 0x118)))))""")
        registry.deploy("test", f"s{count}", module)
        result = executor.execute("test", f"s{count}", {})
        assert (result.ok, result.output) == (True, True), result.error


def test_an_untrampolined_module_with_numeric_functions_only(registry: Registry, executor: Executor) -> None:
    """No string function: no rewrite and no guest memory, only the provider's functions under
    their guest-facing names."""
    registry.add_provider(API_V2, abi.wasm("wasm_api_provider"))
    module = untrampolined(
        f'(import "{API_V2}" "shopify_function_output_new_array" (func $a (param i32) (result i32)))'
        f'(import "{API_V2}" "shopify_function_output_new_bool" (func $b (param i32) (result i32)))'
        f'(import "{API_V2}" "shopify_function_output_new_f64" (func $f (param f64) (result i32)))'
        f'(import "{API_V2}" "shopify_function_output_finish_array" (func $e (result i32)))',
        "(drop (call $a (i32.const 2))) (drop (call $b (i32.const 1))) (drop (call $f (f64.const 0.5)))"
        " (drop (call $e))",
    )
    assert linkable(module) is module
    registry.deploy("test", "s", module)
    result = executor.execute("test", "s", {})
    assert (result.ok, result.output) == (True, [True, 0.5]), result.error
