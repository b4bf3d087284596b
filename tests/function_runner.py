"""A reference for ``scriptpool run --local --json``: Shopify function-runner's report of one
run, worked out independently of scriptpool's engine, with wasmtime-py's public API and
wasmtime's own WASI, following function-runner's ``src/engine.rs``, ``src/io.rs`` and
``src/function_run_result.rs``:

* an engine with fuel and epochs, a store with all the fuel there is (``u64::MAX``), set after a
  memory-I/O provider's ``initialize`` and again before its ``finalize``, so neither is counted;
* ``instructions`` = ``u64::MAX`` - the fuel left after the entry;
* ``memory_usage`` = the peak size of the largest memory of the store, in KiB; ``size`` = the
  module's bytes // 1024; ``name`` = the file name;
* the codec from the imports (``shopify_function_v*``, ``shopify_functions_javy_v2+``:
  MessagePack), the input minified (or MessagePack), the output decoded with the input's codec;
  one difference is deliberate: the JSON input has ``/``, U+2028 and U+2029 escaped as Shopify's
  production writes it (function-runner re-minifies its input file without them), because that
  is what the pool and ``run --local`` send;
* ``success`` = the entry returned (or exited 0); on failure the error's text is appended to
  ``logs``.

Our memories only grow, so their size after the run is their peak (function-runner tracks it in
a resource limiter, which wasmtime-py does not expose).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import wasmtime

U64_MAX = (1 << 64) - 1
FIELDS = ("name", "size", "memory_usage", "instructions", "logs", "input", "output", "success")


def _msgpack_codec(module: wasmtime.Module) -> bool:
    for imp in module.imports:
        name = imp.module
        if name.startswith("shopify_function_v"):
            return True
        javy = name.removeprefix("shopify_functions_javy_v")
        if javy != name and javy.isdigit() and int(javy) >= 2:
            return True
    return False


def _memories(store: wasmtime.Store, instance: wasmtime.Instance) -> list[wasmtime.Memory]:
    return [item for _, item in instance.exports(store).items() if isinstance(item, wasmtime.Memory)]


def run(
    name: str,
    wasm: bytes,
    input_value: Any,
    *,
    export: str = "_start",
    provider: tuple[str, bytes] | None = None,
) -> dict[str, Any]:
    """function-runner's report of running ``wasm`` on ``input_value``."""
    config = wasmtime.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    config.wasm_multi_memory = True
    engine = wasmtime.Engine(config)
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1)
    module = wasmtime.Module(engine, wasm)
    packed = _msgpack_codec(module)
    raw_input = (
        msgpack.packb(input_value)
        if packed
        else json.dumps(input_value, separators=(",", ":"), ensure_ascii=False)
        .replace("/", "\\/")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
        .encode()
    )
    linker = wasmtime.Linker(engine)
    memories: list[wasmtime.Memory] = []
    provider_instance: wasmtime.Instance | None = None
    memory_io = provider is not None and _memory_io(provider[0])
    scratch = Path(tempfile.mkdtemp(prefix="function-runner-ref-"))
    if not memory_io:
        (scratch / "stdin").write_bytes(raw_input)
        wasi = wasmtime.WasiConfig()
        wasi.stdin_file = str(scratch / "stdin")
        wasi.stdout_file = str(scratch / "stdout")
        wasi.stderr_file = str(scratch / "stderr")
        store.set_wasi(wasi)
        linker.define_wasi()
    if provider is not None:
        store.set_fuel(U64_MAX)
        provider_instance = linker.instantiate(store, wasmtime.Module(engine, provider[1]))
        linker.define_instance(store, provider[0], provider_instance)
        memories += _memories(store, provider_instance)
        if memory_io:
            exports = provider_instance.exports(store)
            pointer = exports["initialize"](store, len(raw_input))
            exports["memory"].write(store, raw_input, pointer)
    store.set_fuel(U64_MAX)
    error = None
    try:
        instance = linker.instantiate(store, module)
        memories += _memories(store, instance)
        instance.exports(store)[export](store)
    except wasmtime.ExitTrap as exc:
        if exc.code != 0:
            error = f"module exited with code: {exc.code}"
    except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
        error = str(exc)
    instructions = U64_MAX - store.get_fuel()
    if memory_io and provider_instance is not None:
        store.set_fuel(U64_MAX)
        exports = provider_instance.exports(store)
        memory = exports["memory"]
        at = exports["finalize"](store)
        out_ptr, out_len, log1, log1_len, log2, log2_len = struct.unpack(
            "<6I", memory.read(store, at, at + 24)
        )
        output_bytes = memory.read(store, out_ptr, out_ptr + out_len)
        log_bytes = memory.read(store, log1, log1 + log1_len) + memory.read(store, log2, log2 + log2_len)
    else:
        output_bytes = (scratch / "stdout").read_bytes()
        log_bytes = (scratch / "stderr").read_bytes()
    logs = script_logs = log_bytes.decode("utf-8", errors="replace")
    if error is not None:
        logs += error
    invalid = False
    try:
        output = msgpack.unpackb(output_bytes) if packed else json.loads(output_bytes)
    except ValueError as exc:
        invalid = True
        output = {"error": str(exc), "stdout": output_bytes.decode("utf-8", errors="replace")}
    peak = max((m.data_len(store) for m in memories), default=0)
    return {
        "name": name,
        "size": len(wasm) // 1024,
        "memory_usage": peak // 1024,
        "instructions": instructions,
        "logs": logs,
        "input": input_value,
        "output": output,
        "success": error is None,
        # Not a report field: on failure, wasmtime's own text of the error follows these in
        # ``logs`` (a backtrace), where we put our one-line message.
        "script_logs": script_logs,
        "invalid_output": invalid,  # nor this: the output did not decode
    }


def _memory_io(name: str) -> bool:
    for prefix, first in (("shopify_function_v", 2), ("shopify_functions_javy_v", 3)):
        version = name.removeprefix(prefix)
        if version != name and version.isdigit():
            return int(version) >= first
    return False
