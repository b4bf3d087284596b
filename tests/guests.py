"""Small guest modules written in WAT, for precise tests of the ABI and of every limit."""

from __future__ import annotations

import wasmtime

from scriptpool.engine import provided_signatures

WASI = "wasi_snapshot_preview1"


def wasm(wat: str) -> bytes:
    """Assemble WAT text into module bytes."""
    return bytes(wasmtime.wat2wasm(wat))


def _escape(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def writes(stdout: bytes = b"", stderr: bytes = b"", exit_code: int | None = None) -> bytes:
    """A command module that writes fixed bytes to stdout and stderr, then optionally exits."""
    exit_call = f"(call $proc_exit (i32.const {exit_code}))" if exit_code is not None else ""
    return wasm(f"""
    (module
      (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
      (import "{WASI}" "proc_exit" (func $proc_exit (param i32)))
      (memory (export "memory") 2)
      (data (i32.const 1024) "{_escape(stdout)}")
      (data (i32.const 65536) "{_escape(stderr)}")
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 1024))
        (i32.store (i32.const 4) (i32.const {len(stdout)}))
        (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
        (i32.store (i32.const 16) (i32.const 65536))
        (i32.store (i32.const 20) (i32.const {len(stderr)}))
        (drop (call $fd_write (i32.const 2) (i32.const 16) (i32.const 1) (i32.const 24)))
        {exit_call}))
    """)


def echo(burn: int = 0) -> bytes:
    """Reads stdin (up to 60 KiB) and echoes it to stdout: output == input; with ``burn``, first
    spins that many loop iterations (about 4 fuel each: a correct script that is slow)."""
    spin = (
        f"(local.set $n (i32.const {burn})) (loop $spin (local.set $n (i32.sub (local.get $n) "
        "(i32.const 1))) (br_if $spin (local.get $n)))"
        if burn
        else ""
    )
    return wasm(f"""
(module
  (import "{WASI}" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start") (local $total i32) (local $n i32)
    {spin}
    (local.set $total (i32.const 0))
    (block $done (loop $more
      (i32.store (i32.const 0) (i32.add (i32.const 1024) (local.get $total)))
      (i32.store (i32.const 4) (i32.sub (i32.const 61440) (local.get $total)))
      (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $n (i32.load (i32.const 8)))
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $total (i32.add (local.get $total) (local.get $n)))
      (br $more)))
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (local.get $total))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
""")


ECHO = echo()


def digit_gate(threshold: int, *, fail: bool = False) -> bytes:
    """For input ``{"n":D}`` (minified, one digit D): echoes it while D < ``threshold``; from
    there prints ``{"n":-1}``, or with ``fail`` exits 1. A candidate that agrees on some inputs."""
    other = (
        "(call $exit (i32.const 1))"
        if fail
        else "(i32.store (i32.const 0) (i32.const 512)) (i32.store (i32.const 4) (i32.const 8))"
    )
    return wasm(f"""(module
      (import "{WASI}" "proc_exit" (func $exit (param i32)))
      (import "{WASI}" "fd_read" (func $r (param i32 i32 i32 i32) (result i32)))
      (import "{WASI}" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 512) "{{\\"n\\":-1}}")
      (func (export "_start") (local $len i32)
        (i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (i32.const 1024))
        (drop (call $r (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (local.set $len (i32.load (i32.const 8)))
        (if (i32.ge_u (i32.sub (i32.load8_u (i32.const 1029)) (i32.const 48)) (i32.const {threshold}))
          (then {other})
          (else (i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (local.get $len))))
        (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))""")


INFINITE_LOOP = wasm('(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))')

RECURSION = wasm('(module (memory (export "memory") 1) (func $f (export "_start") (call $f)))')

TRAP = wasm('(module (memory (export "memory") 1) (func (export "_start") unreachable))')

# Grows memory one page at a time until the limit refuses, then aborts as libc would.
MEMORY_BOMB = wasm("""
(module (memory (export "memory") 1)
  (func (export "_start")
    (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable))
""")

# Declares more initial memory (200 pages = 12.5 MiB) than the default 10,000 kB limit.
HUGE_INITIAL_MEMORY = wasm('(module (memory (export "memory") 200) (func (export "_start")))')

# Writes 64 KiB to stdout in 1 KiB chunks: past the 20 kB output limit.
OUTPUT_FLOOD = wasm(f"""
(module
  (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $i i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 1024))
    (loop $l
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 64))))))
""")

# Writes 100 KiB to stderr: logs must be truncated with a marker, not fail the run.
LOG_FLOOD = wasm(f"""
(module
  (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 2048) "{{}}")
  (func (export "_start") (local $i i32)
    (i32.store (i32.const 0) (i32.const 4096))
    (i32.store (i32.const 4) (i32.const 1024))
    (loop $l
      (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 100))))
    (i32.store (i32.const 0) (i32.const 2048))
    (i32.store (i32.const 4) (i32.const 2))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
""")

# Reads the realtime clock and 16 random bytes, and prints them as a JSON array of numbers.
# Output: [time_low32, time_high32, r0, r1, r2, r3] (u32 words), all decimal via a tiny itoa.
CLOCK_AND_RANDOM = wasm(f"""
(module
  (import "{WASI}" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "{WASI}" "random_get" (func $random (param i32 i32) (result i32)))
  (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $out (mut i32) (i32.const 4096))
  (func $byte (param $b i32)
    (i32.store8 (global.get $out) (local.get $b))
    (global.set $out (i32.add (global.get $out) (i32.const 1))))
  (func $u32 (param $v i32) (local $div i32) (local $started i32)
    (local.set $div (i32.const 1000000000))
    (loop $l
      (if (i32.or (local.get $started)
                  (i32.or (i32.ge_u (local.get $v) (local.get $div)) (i32.eq (local.get $div) (i32.const 1))))
        (then
          (call $byte (i32.add (i32.const 48) (i32.div_u (local.get $v) (local.get $div))))
          (local.set $started (i32.const 1))))
      (local.set $v (i32.rem_u (local.get $v) (local.get $div)))
      (local.set $div (i32.div_u (local.get $div) (i32.const 10)))
      (br_if $l (i32.ne (local.get $div) (i32.const 0)))))
  (func (export "_start") (local $i i32)
    (drop (call $clock (i32.const 0) (i64.const 1) (i32.const 0)))
    (drop (call $random (i32.const 8) (i32.const 16)))
    (call $byte (i32.const 91))
    (loop $l
      (if (local.get $i) (then (call $byte (i32.const 44))))
      (call $u32 (i32.load (i32.mul (local.get $i) (i32.const 4))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 6))))
    (call $byte (i32.const 93))
    (i32.store (i32.const 64) (i32.const 4096))
    (i32.store (i32.const 68) (i32.sub (global.get $out) (i32.const 4096)))
    (drop (call $fd_write (i32.const 1) (i32.const 64) (i32.const 1) (i32.const 72)))))
""")

# Asks for environment sizes and opens a path: must see an empty env and EBADF (8).
# Prints [env_count, env_bytes, path_open_errno, prestat_errno].
PROBE_HOST = wasm(f"""
(module
  (import "{WASI}" "environ_sizes_get" (func $env (param i32 i32) (result i32)))
  (import "{WASI}" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "{WASI}" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
  (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "/etc/passwd")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 99))
    (i32.store (i32.const 4) (i32.const 99))
    (drop (call $env (i32.const 0) (i32.const 4)))
    (i32.store8 (i32.const 4096) (i32.const 91))
    (i32.store8 (i32.const 4097) (i32.add (i32.const 48) (i32.load (i32.const 0))))
    (i32.store8 (i32.const 4098) (i32.const 44))
    (i32.store8 (i32.const 4099) (i32.add (i32.const 48) (i32.load (i32.const 4))))
    (i32.store8 (i32.const 4100) (i32.const 44))
    (i32.store8 (i32.const 4101) (i32.add (i32.const 48)
      (call $open (i32.const 3) (i32.const 0) (i32.const 200) (i32.const 11) (i32.const 0)
                  (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 300))))
    (i32.store8 (i32.const 4102) (i32.const 44))
    (i32.store8 (i32.const 4103) (i32.add (i32.const 48) (call $prestat (i32.const 3) (i32.const 300))))
    (i32.store8 (i32.const 4104) (i32.const 93))
    (i32.store (i32.const 64) (i32.const 4096))
    (i32.store (i32.const 68) (i32.const 9))
    (drop (call $fd_write (i32.const 1) (i32.const 64) (i32.const 1) (i32.const 72)))))
""")

FORBIDDEN_ENV_IMPORT = wasm("""
(module (import "env" "steal_secrets" (func)) (memory (export "memory") 1) (func (export "_start")))
""")

# A real WASI name with the wrong signature must not link.
WRONG_SIGNATURE_IMPORT = wasm(f"""
(module (import "{WASI}" "fd_write" (func (param i32) (result i32)))
  (memory (export "memory") 1) (func (export "_start")))
""")

# A provider: exports its own memory and `answer`, which returns 42, and `boom`, which traps.
PROVIDER = wasm("""
(module (memory (export "memory") 1)
  (func (export "answer") (result i32) (i32.const 42))
  (func (export "boom") unreachable))
""")


def provider_user(provider: str, call: str) -> bytes:
    """A module that calls ``call`` on ``provider``; for ``answer`` it prints the result."""
    if call == "answer":
        body = """
        (i32.store8 (i32.const 4096) (i32.add (i32.const 48) (i32.div_u (call $p) (i32.const 10))))
        (i32.store8 (i32.const 4097) (i32.add (i32.const 48) (i32.rem_u (call $p) (i32.const 10))))
        (i32.store (i32.const 0) (i32.const 4096))
        (i32.store (i32.const 4) (i32.const 2))
        (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))"""
        ty = "(result i32)"
    else:
        body, ty = "(call $p)", ""
    return wasm(f"""
    (module
      (import "{provider}" "{call}" (func $p {ty}))
      (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "_start") {body}))
    """)


# Well-formed modules that end badly, one way each.
NONZERO_EXIT = writes(b"{}", b"giving up", exit_code=3)
INVALID_JSON = writes(b"this is not json")
NON_UTF8 = writes(b"\xff\xfe{}")

# Traps in its start function, i.e. while being instantiated, before the entry runs.
START_TRAP = wasm(
    '(module (memory (export "memory") 1) (func $s unreachable) (start $s) (func (export "_start")))'
)

# Loads from far outside its one page of memory.
OUT_OF_BOUNDS = wasm(
    '(module (memory (export "memory") 1) (func (export "_start") (drop (i32.load (i32.const 0x7ffffff0)))))'
)

# Bytes that are refused at deploy: a valid header then garbage, and not Wasm at all.
TRUNCATED_MODULE = b"\0asm\x01\0\0\0garbage"
NOT_WASM = b"MZ\x90\0 this is a PE executable, not WebAssembly"

# Exports `run` but no `_start`, so the default entry is missing.
MISSING_ENTRY = wasm('(module (memory (export "memory") 1) (func (export "run")))')

# Imports a socket-opening function that WASI preview 1 does not have (WasmEdge's extension).
SOCKET_OPEN_IMPORT = wasm(f"""
(module (import "{WASI}" "sock_open" (func (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1) (func (export "_start")))
""")


def oversized(size: int) -> bytes:
    """A valid module of more than ``size`` bytes (a big data segment), otherwise harmless."""
    pages = size // 65536 + 2
    return wasm(
        f'(module (memory (export "memory") {pages}) (data (i32.const 0) "{"a" * (size + 1)}")'
        '(func (export "_start")))'
    )


def wasi_errnos(calls: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """A module that makes each WASI call with the given arguments (pointers land in its one page
    of scratch memory) and prints the errnos they return as a JSON array of numbers."""
    signatures = provided_signatures()
    imports, body = [], []
    for name in dict.fromkeys(name for name, _ in calls if name != "fd_write"):  # fd_write: imported below
        params, results = signatures[name]
        imports.append(
            f'(import "{WASI}" "{name}" (func ${name} (param {" ".join(params)}) (result {results[0]})))'
        )
    for index, (name, args) in enumerate(calls):
        params, _ = signatures[name]
        consts = " ".join(f"({ty}.const {value})" for ty, value in zip(params, args, strict=True))
        if index:
            body.append("(call $byte (i32.const 44))")
        body.append(f"(call $u32 (call ${name} {consts}))")
    return wasm(f"""
    (module
      {" ".join(imports)}
      (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (global $out (mut i32) (i32.const 4096))
      (func $byte (param $b i32)
        (i32.store8 (global.get $out) (local.get $b))
        (global.set $out (i32.add (global.get $out) (i32.const 1))))
      (func $u32 (param $v i32) (local $div i32) (local $started i32)
        (local.set $div (i32.const 1000000000))
        (loop $l
          (if (i32.or (local.get $started)
                      (i32.or (i32.ge_u (local.get $v) (local.get $div))
                              (i32.eq (local.get $div) (i32.const 1))))
            (then
              (call $byte (i32.add (i32.const 48) (i32.div_u (local.get $v) (local.get $div))))
              (local.set $started (i32.const 1))))
          (local.set $v (i32.rem_u (local.get $v) (local.get $div)))
          (local.set $div (i32.div_u (local.get $div) (i32.const 10)))
          (br_if $l (i32.ne (local.get $div) (i32.const 0)))))
      (func (export "_start")
        (call $byte (i32.const 91))
        {" ".join(body)}
        (call $byte (i32.const 93))
        (i32.store (i32.const 64) (i32.const 4096))
        (i32.store (i32.const 68) (i32.sub (global.get $out) (i32.const 4096)))
        (drop (call $fd_write (i32.const 1) (i32.const 64) (i32.const 1) (i32.const 72)))))
    """)


def per_byte_work(rounds: int) -> bytes:
    """Reads its input (up to 1 MiB) and reads every byte ``rounds`` times, then prints ``{}``:
    its instruction count grows with the input, as a script looping over cart lines does."""
    return wasm(f"""
    (module
      (import "{WASI}" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
      (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 17)
      (data (i32.const 16) "{{}}")
      (global $sink (mut i32) (i32.const 0))
      (func (export "_start") (local $total i32) (local $n i32) (local $i i32) (local $k i32)
        (block $done (loop $more
          (i32.store (i32.const 0) (i32.add (i32.const 1024) (local.get $total)))
          (i32.store (i32.const 4) (i32.sub (i32.const 1048576) (local.get $total)))
          (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
          (local.set $n (i32.load (i32.const 8)))
          (br_if $done (i32.eqz (local.get $n)))
          (local.set $total (i32.add (local.get $total) (local.get $n)))
          (br $more)))
        (block $bytes_done (loop $bytes
          (br_if $bytes_done (i32.ge_u (local.get $i) (local.get $total)))
          (local.set $k (i32.const 0))
          (loop $round
            (global.set $sink (i32.add (global.get $sink)
              (i32.load8_u (i32.add (i32.const 1024) (local.get $i)))))
            (local.set $k (i32.add (local.get $k) (i32.const 1)))
            (br_if $round (i32.lt_u (local.get $k) (i32.const {rounds}))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $bytes)))
        (i32.store (i32.const 0) (i32.const 16))
        (i32.store (i32.const 4) (i32.const 2))
        (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
    """)


def cart(lines: int) -> dict[str, object]:
    """A checkout input with ``lines`` cart lines (about 60 bytes each)."""
    return {
        "cart": {
            "lines": [
                {"id": f"gid://shopify/CartLine/{n}", "quantity": 1, "cost": {"amount": "10.0"}}
                for n in range(lines)
            ]
        }
    }


def iovec_flood(
    call: str, fd: int, count: int, length: int, *, pages: int = 156, forever: bool = False
) -> bytes:
    """A guest that writes ``count`` iovecs at address 0, each naming the first ``length`` bytes
    of its ``pages``-page memory, passes them all to one ``call`` (fd_write or fd_read) on ``fd``
    and exits with the errno it got; with ``forever``, it makes the same call again and again."""
    again = "(br $again)" if forever else ""
    return wasm(f"""
    (module
      (import "{WASI}" "{call}" (func $io (param i32 i32 i32 i32) (result i32)))
      (import "{WASI}" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") {pages})
      (func (export "_start") (local $i i32) (local $errno i32)
        (block $done (loop $fill
          (br_if $done (i32.ge_u (local.get $i) (i32.const {count})))
          (i32.store (i32.mul (local.get $i) (i32.const 8)) (i32.const 0))
          (i32.store offset=4 (i32.mul (local.get $i) (i32.const 8)) (i32.const {length}))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $fill)))
        (loop $again
          (local.set $errno
            (call $io (i32.const {fd}) (i32.const 0) (i32.const {count}) (i32.const {pages * 65536 - 4})))
          {again})
        (call $exit (local.get $errno))))
    """)


def random_flood(length: int, *, pages: int = 156) -> bytes:
    """A guest that asks ``random_get`` for ``length`` bytes at address 0 and exits with the errno."""
    return wasm(f"""
    (module
      (import "{WASI}" "random_get" (func $random (param i32 i32) (result i32)))
      (import "{WASI}" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") {pages})
      (func (export "_start") (call $exit (call $random (i32.const 0) (i32.const {length})))))
    """)
