"""Compile bombs: modules under the size limit made to keep the compiler busy for minutes.

Each is refused with its named error at deploy within a few seconds (the structural caps before
anything compiles, then the compile child's time and memory bounds), nothing is bound, and a
good deploy right after works. The structural reader is tested against hostile bytes, and a
real worker that must compile a planted bomb on the job path answers with the named error and
serves a good script right after, in the same process.

Long on purpose: the tiny Wasm binary writer and the bombs built with it at the top are shared
by every section (at deploy, the structural reader, on the job path), and the structural reader's
test module (``FEATURES_WAT``) alone is over a hundred lines of WAT.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import wasmtime

from scriptpool.config import Settings
from scriptpool.config.errors import ForbiddenImport, InvalidModule, ModuleTooComplex, ScriptpoolError
from scriptpool.engine import Sandbox, compile_engine
from scriptpool.producer import BreakerPolicy, Client
from scriptpool.registry import Registry, _bounded_compile
from scriptpool.registry import _compile as compile_module
from scriptpool.registry._bounded_compile import Bounds, Compiled, compile_bounded
from scriptpool.registry._structure import CAPS, Caps
from scriptpool.registry._structure_reader import read_structure
from tests import guests
from tests.conftest import EXAMPLES, deployer_fixture
from tests.pool import WorkerProcess, pid_of, pool_fixtures

# -- a tiny Wasm binary writer ---------------------------------------------------------------------

I32 = 0x7F
VOID = b"\x60\x00\x00"  # type 0: () -> ()
FD_WRITE_TYPE = b"\x60\x04\x7f\x7f\x7f\x7f\x01\x7f"  # type 1: (i32 i32 i32 i32) -> i32


def uleb(n: int) -> bytes:
    """``n`` as an unsigned LEB128."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def vec(items: list[bytes]) -> bytes:
    return uleb(len(items)) + b"".join(items)


def name(text: str) -> bytes:
    raw = text.encode()
    return uleb(len(raw)) + raw


def section(section_id: int, payload: bytes) -> bytes:
    return bytes([section_id]) + uleb(len(payload)) + payload


def body(code: bytes, locals_: int = 0) -> bytes:
    """A function body (size-prefixed): ``locals_`` i32 locals, ``code``, then ``end``."""
    declared = vec([uleb(locals_) + bytes([I32])]) if locals_ else vec([])
    inner = declared + code + b"\x0b"
    return uleb(len(inner)) + inner


def func_import(module: str, field: str, type_index: int) -> bytes:
    return name(module) + name(field) + b"\x00" + uleb(type_index)


def script(bodies: list[bytes], imports: list[bytes] | None = None) -> bytes:
    """A module of these function bodies (all of type () -> ()) and imports: one memory,
    exported as ``memory``, and its first function exported as ``_start``."""
    imports = imports or []
    out = b"\0asm\x01\0\0\0" + section(1, vec([VOID, FD_WRITE_TYPE]))
    if imports:
        out += section(2, vec(imports))
    out += section(3, uleb(len(bodies)) + b"\x00" * len(bodies))
    out += section(5, vec([b"\x00\x01"]))
    start = name("_start") + b"\x00" + uleb(len(imports))
    out += section(7, vec([start, name("memory") + b"\x02\x00"]))
    out += section(10, uleb(len(bodies)) + b"".join(bodies))
    return out


# -- the bombs -------------------------------------------------------------------------------------


def nested(depth: int, opcode: int) -> bytes:
    """``depth`` blocks (0x02) or loops (0x03) inside one another."""
    return body(bytes([opcode, 0x40]) * depth + b"\x0b" * depth)


def sequential_loops(n: int) -> bytes:
    return body(b"\x03\x40\x0b" * n)


def branches(n: int) -> bytes:
    """One block holding ``n`` ``br_if 0``."""
    return body(b"\x02\x40" + b"\x41\x01\x0d\x00" * n + b"\x0b")


def branchy_locals(n: int) -> bytes:
    """A loop that updates ``n`` locals, each followed by a ``br_if`` back to the loop head: every
    branch carries every local, so the compiler's work grows with locals times branches."""
    code = bytearray(b"\x03\x40")
    for i in range(n):
        code += b"\x20" + uleb(i) + b"\x41\x01\x6a\x22" + uleb(i) + b"\x0d\x00"
    return body(bytes(code) + b"\x0b", locals_=n)


FD_WRITE = func_import(guests.WASI, "fd_write", 1)
FORBIDDEN = func_import("env", "steal_secrets", 0)

# The finding: 78,000 nested loops (234 KB), with a forbidden import too.
NESTED_LOOPS = script([nested(78_000, 0x03)], [FORBIDDEN])
# Under every cap, and slow to compile all the same: ~1 s each of 23 functions here.
SLOW_UNDER_CAPS = script([branchy_locals(1_000)] * 23)

# name -> (module, the error code, the cap it is over). All fit the default 256 KB module limit.
STRUCTURAL_BOMBS: dict[str, tuple[bytes, str, str]] = {
    "nested-loops": (NESTED_LOOPS, "module_too_complex", "loops in one function"),
    "nested-blocks": (script([nested(80_000, 0x02)]), "module_too_complex", "nested blocks in one function"),
    "many-loops": (script([sequential_loops(50_000)]), "module_too_complex", "loops in one function"),
    "many-branches": (script([branches(60_000)]), "module_too_complex", "branches in one function"),
    "many-locals": (script([branchy_locals(15_000)]), "module_too_complex", "locals in one function"),
    "many-functions": (script([body(b"")] * 60_000), "module_too_complex", "functions"),
}


def forbidden_import_last() -> bytes:
    """1,000 imports (as many as the cap allows), 999 of them fine and the forbidden one last,
    before a code section that would compile for much longer than its bound."""
    return script([branchy_locals(1_000)] * 20, [FD_WRITE] * 999 + [FORBIDDEN])


def _lying(section_id: int, payload: bytes) -> bytes:
    return b"\0asm\x01\0\0\0" + section(1, vec([VOID])) + section(section_id, payload)


MAX_U32 = uleb(2**32 - 1)
MALFORMED: dict[str, bytes] = {
    "truncated-in-code": (EXAMPLES / "discount" / "discount.wasm").read_bytes()[:30_000],
    "lying-function-count": _lying(3, MAX_U32 + b"\x00"),
    "lying-import-count": _lying(2, MAX_U32 + b"\x01a"),
    "lying-body-count": _lying(10, MAX_U32 + b"\x02\x00\x0b"),
    "lying-locals-count": script([uleb(7) + MAX_U32 + b"\x7f\x0b"]),
    "lying-br-table": script([body(b"\x02\x40\x41\x00\x0e" + MAX_U32 + b"\x00\x0b")]),
    "lying-section-size": b"\0asm\x01\0\0\0\x01" + MAX_U32 + VOID,
    "overlong-leb": b"\0asm\x01\0\0\0\x01" + b"\x80" * 12 + b"\x00",
    "unknown-instruction": script([body(b"\x06")]),  # legacy `try`: not accepted by the engine
    "a-component": b"\0asm\x0d\0\x01\0",
}


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the modules a deploy compiled (the bounded compile is watched)."""
    seen: list[int] = []

    def watched(wasm: bytes, stack_bytes: int, bounds: Bounds | None = None) -> Compiled:
        seen.append(len(wasm))
        return compile_bounded(wasm, stack_bytes, bounds)

    monkeypatch.setattr(compile_module, "compile_bounded", watched)
    return seen


def redis_state(client: redis.Redis) -> dict[Any, Any]:
    """Every key in Redis with its serialized value."""
    return {key: client.dump(key) for key in client.keys("*")}


def deploy_refused(registry: Registry, wasm: bytes, *, ep: str = "test") -> tuple[ScriptpoolError, float]:
    """Deploy ``wasm``, which must be refused; the error and how long the refusal took."""
    started = time.perf_counter()
    with pytest.raises(ScriptpoolError) as caught:
        registry.deploy(ep, "bombs", wasm)
    return caught.value, time.perf_counter() - started


def good_deploy_runs(registry: Registry, sandbox: Sandbox, settings: Settings) -> None:
    """A good script deployed right after is served."""
    from scriptpool.runtime import Executor

    registry.deploy("test", "after", guests.ECHO)
    result = Executor(registry, sandbox, settings).execute("test", "after", {"after": 1})
    assert result.ok and result.output == {"after": 1}, result.error


# -- at deploy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STRUCTURAL_BOMBS)
def test_structural_bombs_are_refused_at_deploy_before_anything_compiles(
    kind: str,
    registry: Registry,
    redis_client: redis.Redis,
    sandbox: Sandbox,
    settings: Settings,
    compiles: list[int],
) -> None:
    """Deep nesting, many loops, branches, locals or functions: refused by a structural cap
    (module_too_complex, naming the cap), with nothing compiled and nothing in Redis changed;
    a good deploy right after is served."""
    wasm, code, measure = STRUCTURAL_BOMBS[kind]
    assert len(wasm) <= 256 * 1024
    before = redis_state(redis_client)
    error, _ = deploy_refused(registry, wasm)
    assert (error.code, error.detail["measure"]) == (code, measure), error
    assert error.detail["value"] > error.detail["cap"]
    assert compiles == []
    assert redis_state(redis_client) == before
    good_deploy_runs(registry, sandbox, settings)


def test_a_huge_function_body_is_refused_by_its_cap(
    registry: Registry, redis_client: redis.Redis, compiles: list[int]
) -> None:
    """A 1.1 MB function of plain instructions, under an EP whose module limit lets it in: the
    per-function cap refuses it before anything compiles."""
    registry.define_extension_point("big", limits={"module_bytes": 2 << 20})
    before = redis_state(redis_client)
    error, _ = deploy_refused(registry, script([body(b"\x41\x01\x1a" * 370_000)]), ep="big")
    assert (error.code, error.detail["measure"]) == ("module_too_complex", "bytes in one function body")
    assert compiles == []
    assert redis_state(redis_client) == before


def test_forbidden_import_at_the_end_of_a_huge_module_is_refused_before_compiling(
    registry: Registry, redis_client: redis.Redis, sandbox: Sandbox, settings: Settings, compiles: list[int]
) -> None:
    """The forbidden import is the last of 1,000 and the code after it would outlast its compile
    bound: the import check runs on the structure, so it is forbidden_import at once."""
    wasm = forbidden_import_last()
    assert len(wasm) <= 256 * 1024
    before = redis_state(redis_client)
    error, _ = deploy_refused(registry, wasm)
    assert isinstance(error, ForbiddenImport) and error.detail["name"] == "env.steal_secrets"
    assert compiles == []
    assert redis_state(redis_client) == before
    good_deploy_runs(registry, sandbox, settings)


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_bytes_are_refused_as_invalid_module(
    kind: str, registry: Registry, redis_client: redis.Redis, compiles: list[int]
) -> None:
    """Truncated modules, counts and sizes that lie, overlong numbers, unknown instructions and
    components: invalid_module from the reader, before anything compiles."""
    before = redis_state(redis_client)
    error, _ = deploy_refused(registry, MALFORMED[kind])
    assert type(error) is InvalidModule, error
    assert compiles == []
    assert redis_state(redis_client) == before


def test_module_under_every_cap_that_compiles_too_long_is_refused_at_its_time_bound(
    registry: Registry, redis_client: redis.Redis, sandbox: Sandbox, settings: Settings, compiles: list[int]
) -> None:
    """A module no cap refuses but whose compile outlasts its bound (about 23 s of compiling
    here, bound 3.9 s): the child is killed at the bound and the deploy is module_too_complex
    (bound: time), within twice the bound; nothing bound; a good deploy right after works."""
    wasm = SLOW_UNDER_CAPS
    read_structure(wasm)  # no cap refuses it
    bound = Bounds.for_size(len(wasm)).seconds
    registry.deploy("test", "warm", guests.ECHO)  # the compile server is running
    before = redis_state(redis_client)
    error, took = deploy_refused(registry, wasm)
    assert (error.code, error.detail["bound"]) == ("module_too_complex", "time"), error
    assert took <= 2 * bound
    assert compiles[-1:] == [len(wasm)]
    assert redis_state(redis_client) == before
    good_deploy_runs(registry, sandbox, settings)


def test_compile_past_its_memory_bound_is_refused() -> None:
    """A compile that maps more than its memory bound is stopped by the kernel (RLIMIT_AS):
    module_too_complex (bound: memory); the next compile works."""
    wasm = script([sequential_loops(20_000)])  # ~800 MB of address space to compile
    with pytest.raises(ModuleTooComplex) as caught:
        compile_bounded(wasm, 512 * 1024, Bounds(seconds=60, memory_bytes=384 << 20))
    assert caught.value.detail["bound"] == "memory"
    assert compile_bounded(guests.ECHO, 512 * 1024).artifact


def test_bounded_compile_gives_an_artifact_that_runs(sandbox: Sandbox) -> None:
    """The artifact from the child loads into the sandbox's own engine and runs."""
    from scriptpool.config import Limits

    wasm = (EXAMPLES / "discount" / "discount.wasm").read_bytes()
    compiled = compile_bounded(wasm, Limits().stack_bytes)
    assert compiled.peak_rss_bytes > 0 and compiled.seconds > 0
    module = sandbox.deserialize(compiled.artifact, Limits().stack_bytes)
    payload = (EXAMPLES / "discount" / "input.json").read_bytes()
    run = sandbox.run(module, payload, Limits())
    assert run.error is None
    assert json.loads(run.stdout) == json.loads((EXAMPLES / "discount" / "expected_output.json").read_text())


def test_a_module_only_the_compiler_finds_invalid_is_invalid_module() -> None:
    """Well-formed bytes with a type error: the child reports wasmtime's message."""
    wasm = script([body(b"\x41\x01")])  # leaves an i32 on the stack of a () -> () function
    read_structure(wasm)
    with pytest.raises(InvalidModule, match=r"module does not compile: .*type mismatch"):
        compile_bounded(wasm, 512 * 1024)


# -- the structural reader -------------------------------------------------------------------------

# An instruction of every proposal the engine accepts, with imports and exports of every kind.
FEATURES_WAT = """
(module
  (rec (type $s (sub (struct (field $a (mut i32)) (field i8) (field (ref null $s)))))
       (type $arr (array (mut i16))))
  (type $ft (func (param i32) (result i32)))
  (type $sub (sub final $s (struct (field $a (mut i32)) (field i8) (field (ref null $s)) (field f64))))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "env" "g" (global $ig i64))
  (import "env" "t" (table $it 2 externref))
  (import "env" "mem" (memory $im 1 3))
  (tag $e (param i32))
  (memory $m 1)
  (memory $m2 1)
  (memory $m64 i64 1 2)
  (table $t 4 funcref)
  (table $tt 2 (ref null $ft) (ref.null $ft))
  (global $g (mut i32) (i32.add (i32.const 1) (i32.mul (i32.const 2) (i32.const 3))))
  (elem declare func $id)
  (data $d "hello")
  (elem $el funcref (ref.func $id))
  (func $id (type $ft) (local.get 0))
  (func $tail (param i32) (result i32) (return_call $id (local.get 0)))
  (func $tail2 (param i32) (result i32) (return_call_indirect $t (type $ft) (local.get 0) (i32.const 0)))
  (func $tail3 (param i32) (result i32) (return_call_ref $ft (local.get 0) (ref.func $id)))
  (func $refs (param (ref null $ft)) (result i32)
    (block $l (result (ref $ft)) (br_on_non_null $l (local.get 0)) (return (i32.const 0)))
    (drop)
    (block $n (br_on_null $n (local.get 0)) (drop))
    (call_ref $ft (i32.const 1) (ref.as_non_null (local.get 0))))
  (func $gc (result i32) (local $x (ref null $s)) (local $y anyref) (local $arr (ref null $arr))
    (local.set $x (struct.new $s (i32.const 1) (i32.const 2) (ref.null $s)))
    (drop (struct.new_default $s))
    (drop (struct.get $s $a (local.get $x)))
    (drop (struct.get_s $s 1 (local.get $x)))
    (drop (struct.get_u $s 1 (local.get $x)))
    (struct.set $s $a (local.get $x) (i32.const 5))
    (local.set $arr (array.new $arr (i32.const 1) (i32.const 3)))
    (drop (array.new_default $arr (i32.const 3)))
    (drop (array.new_fixed $arr 2 (i32.const 1) (i32.const 2)))
    (drop (array.new_data $arr $d (i32.const 0) (i32.const 1)))
    (drop (array.get_s $arr (local.get $arr) (i32.const 0)))
    (drop (array.get_u $arr (local.get $arr) (i32.const 0)))
    (array.set $arr (local.get $arr) (i32.const 0) (i32.const 7))
    (drop (array.len (local.get $arr)))
    (array.fill $arr (local.get $arr) (i32.const 0) (i32.const 1) (i32.const 1))
    (array.copy $arr $arr (local.get $arr) (i32.const 0) (local.get $arr) (i32.const 1) (i32.const 1))
    (array.init_data $arr $d (local.get $arr) (i32.const 0) (i32.const 0) (i32.const 1))
    (local.set $y (ref.i31 (i32.const 3)))
    (drop (i31.get_s (ref.cast (ref i31) (local.get $y))))
    (drop (i31.get_u (ref.cast (ref null i31) (local.get $y))))
    (drop (ref.test (ref $s) (local.get $y)))
    (drop (ref.test (ref null $s) (local.get $y)))
    (drop (ref.eq (local.get $x) (local.get $x)))
    (drop (block $c (result (ref $s))
      (br_on_cast $c anyref (ref $s) (local.get $y)) (drop) (struct.new_default $s)))
    (drop (block $c2 (result anyref)
      (br_on_cast_fail $c2 anyref (ref $s) (local.get $y)) (drop) (ref.null any)))
    (drop (extern.convert_any (local.get $y)))
    (drop (any.convert_extern (ref.null extern)))
    (i32.const 0))
  (func $elems (result funcref) (local $fs (ref null $farr))
    (local.set $fs (array.new_elem $farr $el (i32.const 0) (i32.const 1)))
    (array.init_elem $farr $el (local.get $fs) (i32.const 0) (i32.const 0) (i32.const 1))
    (array.get $farr (local.get $fs) (i32.const 0)))
  (type $farr (array (mut funcref)))
  (func $exn (param i32) (result i32)
    (block $none
      (drop (block $h (result i32)
        (try_table (result i32) (catch $e $h) (catch_all $none)
          (throw $e (local.get 0))))))
    (drop (block $r (result exnref)
      (try_table (catch_all_ref $r) (nop)) (return (i32.const 0))))
    (block $r2 (result i32 exnref)
      (try_table (catch_ref $e $r2) (nop)) (return (i32.const 0)))
    (throw_ref))
  (func $simd (param v128) (result v128)
    (v128.store (i32.const 0) (v128.load offset=16 align=4 (i32.const 0)))
    (drop (v128.load8x8_s (i32.const 0)))
    (drop (v128.load32_zero (i32.const 0)))
    (drop (v128.load64_zero (i32.const 0)))
    (drop (v128.load8_lane 3 (i32.const 0) (local.get 0)))
    (v128.store64_lane 1 (i32.const 0) (local.get 0))
    (drop (i8x16.shuffle 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 (local.get 0) (local.get 0)))
    (drop (i32x4.extract_lane 2 (local.get 0)))
    (drop (f64x2.replace_lane 1 (local.get 0) (f64.const 1)))
    (drop (i32x4.relaxed_trunc_f32x4_s (local.get 0)))
    (drop (f32x4.relaxed_madd (local.get 0) (local.get 0) (local.get 0)))
    (drop (i32x4.relaxed_dot_i8x16_i7x16_add_s (local.get 0) (local.get 0) (local.get 0)))
    (drop (f64x2.convert_low_i32x4_u (local.get 0)))
    (v128.const i32x4 1 2 3 4))
  (func $bulk (param i64) (result i32)
    (memory.init $m2 $d (i32.const 0) (i32.const 0) (i32.const 1))
    (data.drop $d)
    (memory.copy $m $m2 (i32.const 0) (i32.const 0) (i32.const 1))
    (memory.fill $m2 (i32.const 0) (i32.const 0) (i32.const 1))
    (table.init $t $el (i32.const 0) (i32.const 0) (i32.const 1))
    (elem.drop $el)
    (table.copy $t $t (i32.const 0) (i32.const 1) (i32.const 1))
    (drop (table.grow $t (ref.null func) (i32.const 1)))
    (drop (table.size $t))
    (table.fill $t (i32.const 0) (ref.null func) (i32.const 1))
    (table.set $t (i32.const 0) (table.get $t (i32.const 1)))
    (drop (i64.load $m64 offset=0x100000000 (local.get 0)))
    (i64.store $m64 (i64.const 0) (i64.const 1))
    (drop (i32.load $m2 offset=4 (i32.const 0)))
    (drop (memory.grow $m2 (i32.const 0)))
    (drop (memory.size $m64))
    (drop (i32.trunc_sat_f64_u (f64.const 1)))
    (drop (i64.extend32_s (i64.const 1)))
    (drop (select (result i32) (i32.const 1) (i32.const 2) (i32.const 0)))
    (drop (ref.is_null (ref.null extern)))
    (global.set $g (i32.const 2))
    (drop (global.get $ig))
    (drop (drop (i64.add128 (i64.const 1) (i64.const 2) (i64.const 3) (i64.const 4))))
    (drop (drop (i64.sub128 (i64.const 1) (i64.const 2) (i64.const 3) (i64.const 4))))
    (drop (drop (i64.mul_wide_s (i64.const 1) (i64.const 2))))
    (drop (drop (i64.mul_wide_u (i64.const 1) (i64.const 2))))
    (drop (f32.const 1.5))
    (block $a (block $b (br_table $a $b $a (i32.const 1))))
    (loop $l (br_if $l (i32.const 0)))
    (if (i32.const 1) (then (nop)) (else (unreachable)))
    (drop (call $fd_write (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))
    (drop (call_indirect $t (type $ft) (i32.const 1) (i32.const 0)))
    (i32.const 0))
  (func (export "_start"))
  (export "memory" (memory $m))
  (export "tab" (table $t))
  (export "g" (global $g))
  (export "tag" (tag $e))
  (start $start)
  (func $start)
)
"""


def _features() -> bytes:
    """A module that uses an instruction of every proposal the engine accepts."""
    return guests.wasm(FEATURES_WAT)


def test_real_modules_measure_far_under_the_caps() -> None:
    """Every example module (C with wasi-libc, WAT guests, the ABI examples) reads, and each
    measure stays under a tenth of its cap."""
    paths = sorted(EXAMPLES.glob("**/*.wasm"))
    assert paths
    caps = {"functions": CAPS.functions, "locals": CAPS.locals, "nesting": CAPS.nesting}
    caps |= {"loops": CAPS.loops, "branches": CAPS.branches, "body_bytes": CAPS.body_bytes}
    caps |= {"types": CAPS.types, "imports": CAPS.imports, "exports": CAPS.exports}
    for path in paths:
        measures = read_structure(path.read_bytes()).measures()
        for measure, cap in caps.items():
            assert measures[measure] * 10 < cap, (path.name, measure, measures[measure])


def test_reader_reads_every_proposal_the_engine_accepts() -> None:
    """GC, exceptions, typed function references, tail calls, SIMD and relaxed SIMD, bulk
    memory, multi-memory, 64-bit memory, extended constants, wide arithmetic: what wasmtime
    accepts, the reader reads, with the same imports and exports."""
    wasm = _features()
    wasmtime.Module.validate(compile_engine(512 * 1024), wasm)
    structure = read_structure(wasm)
    module = wasmtime.Module(compile_engine(512 * 1024), wasm)
    assert [(i.module, i.name) for i in structure.imports] == [(i.module, i.name) for i in module.imports]
    assert [e.name for e in structure.exports] == [e.name for e in module.exports]
    func = next(e for e in structure.exports if e.name == "_start")
    assert isinstance(func.type, wasmtime.FuncType) and not func.type.params
    assert structure.max_loops == 1 and structure.max_branch_targets == 2


BODY = "bytes in one function body"
CAP_CASES: dict[str, tuple[Caps, Callable[[int], bytes], str]] = {
    "functions": (Caps(functions=10), lambda n: script([body(b"")] * n), "functions"),
    "locals": (Caps(locals=10), lambda n: script([body(b"", locals_=n)]), "locals in one function"),
    "nesting": (Caps(nesting=10), lambda n: script([nested(n, 0x02)]), "nested blocks in one function"),
    "loops": (Caps(loops=10), lambda n: script([sequential_loops(n)]), "loops in one function"),
    "branches": (Caps(branches=10), lambda n: script([branches(n)]), "branches in one function"),
    "imports": (Caps(imports=10), lambda n: script([body(b"")], [FD_WRITE] * n), "imports"),
    "body_bytes": (Caps(body_bytes=10), lambda n: script([body(b"\x01" * (n - 2))]), BODY),
}  # fmt: skip


@pytest.mark.parametrize("cap", CAP_CASES)
def test_each_cap_accepts_its_value_and_refuses_one_more(cap: str) -> None:
    """A module at the cap reads; one more is module_too_complex naming the cap."""
    caps, make, measure = CAP_CASES[cap]
    limit = getattr(caps, cap)
    read_structure(make(limit), caps)
    with pytest.raises(ModuleTooComplex) as caught:
        read_structure(make(limit + 1), caps)
    assert (caps, caught.value.detail["measure"], caught.value.detail["cap"]) == (caps, measure, limit)


def section_ends(wasm: bytes) -> set[int]:
    """Where the header and each section of a module end: a module cut there is whole."""
    ends, at = {8}, 8
    while at < len(wasm):
        at += 1
        size = shift = 0
        while True:
            byte = wasm[at]
            at += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        at += size
        ends.add(at)
    return ends


def test_every_truncation_is_invalid_module() -> None:
    """Cut at every byte, a module is invalid_module (and never another error), except where it
    is cut between two sections: that is a shorter module."""
    for wasm in (guests.ECHO, _features()):
        whole = section_ends(wasm)
        for end in range(len(wasm) + 1):
            if end in whole:
                try:
                    read_structure(wasm[:end])
                except InvalidModule as exc:  # the functions declared without their bodies
                    assert type(exc) is InvalidModule
                continue
            with pytest.raises(InvalidModule) as caught:
                read_structure(wasm[:end])
            assert type(caught.value) is InvalidModule


def test_random_corruption_gives_only_named_errors() -> None:
    """3,000 seeded corruptions of a real module (bytes flipped, runs of 0xff, cut-and-spliced):
    each reads, or is invalid_module or module_too_complex; nothing else escapes."""
    original = (EXAMPLES / "discount" / "discount.wasm").read_bytes()
    rng = random.Random(20)
    outcomes: dict[str, int] = {}
    for _ in range(3_000):
        data = bytearray(original)
        kind = rng.randrange(3)
        at = rng.randrange(8, len(data))
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(8, len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[at : at + rng.randint(1, 8)] = b"\xff" * rng.randint(1, 8)
        else:
            data = data[:at] + data[rng.randrange(8, len(data)) :]
        try:
            read_structure(bytes(data))
            outcome = "read"
        except ModuleTooComplex:
            outcome = "module_too_complex"
        except InvalidModule:
            outcome = "invalid_module"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes["invalid_module"] > 1_000  # the corruptions mostly break the module


@pytest.mark.parametrize("kind", [k for k in MALFORMED if k.startswith("lying")])
def test_lying_counts_are_refused_by_the_bytes_left(kind: str) -> None:
    """A count of 4 billion items in a few bytes is refused from the count itself, before any
    loop over it."""
    with pytest.raises(InvalidModule, match=r"declared in|runs past"):
        read_structure(MALFORMED[kind])


# -- on the job path, in a real worker -------------------------------------------------------------

pool_settings, workers = pool_fixtures(1, {"bombs0": [0]})


deployer = deployer_fixture()


@pytest.fixture
def client(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> Iterator[Client]:
    with Client(pool_settings, breaker=BreakerPolicy(error_threshold=10**9)) as c:
        yield c


def plant(store: redis.Redis, settings: Settings, shop: str, wasm: bytes) -> str:
    """What an attacker with write access to Redis does: store ``wasm`` under its content address
    with no artifact, and point the shop's binding at it. Returns its sha256."""
    sha = hashlib.sha256(wasm).hexdigest()
    store.set(settings.keys.module(sha), wasm)
    key = settings.keys.binding("test", shop)
    deployment = json.loads(store.hget(key, "default") or b"{}")
    deployment["sha256"] = sha
    store.hset(key, "default", json.dumps(deployment))
    return sha


def test_worker_refuses_a_planted_bomb_on_the_job_path_and_serves_a_good_script_after(
    client: Client,
    deployer: Registry,
    redis_client: redis.Redis,
    pool_settings: Settings,
    workers: dict[str, WorkerProcess],
) -> None:
    """A module planted in Redis without an artifact, so the worker must compile it for the job:
    a structural bomb is module_too_complex at once, a slow one at its time bound (the job's
    answer within twice it), and asked again the worker answers at once from its memory of the
    refusal. The same worker process then serves a good script."""
    worker = workers["bombs0"]
    deployer.deploy("test", "good", guests.ECHO)
    before = client.run("test", "good", {"n": 1}, timeout=10)
    assert before.status == "ok" and before.output == {"n": 1}
    pid = pid_of(before.worker)

    deployer.deploy("test", "slow", guests.writes(b'{"slow":1}'))
    deployer.deploy("test", "nested", guests.writes(b'{"nested":1}'))
    plant(redis_client, pool_settings, "slow", SLOW_UNDER_CAPS)
    plant(redis_client, pool_settings, "nested", NESTED_LOOPS)
    bound = Bounds.for_size(len(SLOW_UNDER_CAPS)).seconds

    answers: dict[str, list[tuple[Any, float]]] = {}
    for shop in ("nested", "slow", "slow"):
        started = time.perf_counter()
        outcome = client.run("test", shop, {}, timeout=30)
        answers.setdefault(shop, []).append((outcome, time.perf_counter() - started))
    ((nested_outcome, _),) = answers["nested"]
    assert (nested_outcome.status, nested_outcome.error_code) == ("error", "module_too_complex")
    (first, first_s), (again, again_s) = answers["slow"]
    assert (first.status, first.error_code) == ("error", "module_too_complex")
    assert first.error is not None and first.error.detail["bound"] == "time"
    assert first_s <= 2 * bound
    assert (again.error_code, again.error.detail.get("repeated") if again.error else None) == (
        "module_too_complex",
        True,
    )
    assert again_s < first_s
    assert {pid_of(o.worker) for o, _ in answers["slow"] + answers["nested"]} == {pid}

    after = client.run("test", "good", {"n": 2}, timeout=10)
    assert after.status == "ok" and after.output == {"n": 2}
    assert pid_of(after.worker) == pid and worker.alive


def test_a_compile_server_killed_mid_compile_takes_its_compile_with_it() -> None:
    """The server SIGKILLed while its child compiles: the caller gets a named error at once, the
    child does not run on orphaned to its CPU limit (the kernel ends it with its parent), and
    the next compile starts a new server and succeeds."""
    _bounded_compile.start_compile_server()
    server = _bounded_compile._current
    assert server is not None
    caught: list[BaseException] = []

    def compile_slow() -> None:
        try:
            compile_bounded(SLOW_UNDER_CAPS, 512 * 1024)
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=compile_slow)
    thread.start()
    children: list[int] = []
    deadline = time.monotonic() + 30
    while not children and time.monotonic() < deadline:
        with open(f"/proc/{server.process.pid}/task/{server.process.pid}/children") as listing:
            children = [int(pid) for pid in listing.read().split()]
        time.sleep(0.01)
    assert children, "the server never forked its compile"
    os.kill(server.process.pid, signal.SIGKILL)
    thread.join(timeout=30)
    assert len(caught) == 1 and isinstance(caught[0], ScriptpoolError)

    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(running(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(running(pid) for pid in children)
    assert compile_bounded(guests.ECHO, 512 * 1024).artifact
