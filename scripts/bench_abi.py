"""The Shopify ABIs, hot, in one process: memory-I/O echo against the WASI echo, the Wasm API
untrampolined (our glue module) against trampolined (glue inside the guest), and the glue module
against the same glue as a C-API host function.

Run: .venv/bin/python scripts/bench_abi.py [--runs 5000] [--calls 1000]
Starts a private Redis; prints one JSON object. All variants of one comparison run interleaved,
in batches whose order alternates, so they see the same machine noise.

- ``hot_echo_us``: ``Executor.execute`` of an echo, the input as JSON bytes (what a worker
  gets off the queue): the plain WASI echo (JSON on stdin and stdout), our memory-I/O echo
  (MessagePack written into the provider's memory, read back after finalize) and our
  MessagePack-over-WASI echo (a WASI provider, as shopify_functions_javy_v2).
- ``hot_wasm_api_us``: the same Wasm API guest code against our Wasm API provider, trampolined
  (the trampoline's glue inside the guest) and untrampolined (linked by us through the glue
  module, its memory imported).
- ``glue_per_call_ns``: one guest calling ``log_new_utf8_str`` ``--calls`` times per run, linked
  to the glue module's export or to a raw C-API host function (a wasmtime "unchecked" callback,
  the cheapest host call wasmtime-py can make) doing the same copies; the guest's run time per
  call, and what each costs to set up per run.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import secrets
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scriptpool.config import Limits, Settings
from scriptpool.engine import Sandbox
from scriptpool.engine._abi import GLUE_MEMORY_EXPORT, MemoryLimits, glue_wat
from scriptpool.engine._capi import (
    HOST_CALLBACK,
    VAL_I32,
    VAL_RAW_WORDS,
    Val,
    caller_context,
    func_call,
    host_func,
    item_address,
    memory_data,
)
from scriptpool.registry import Registry
from scriptpool.registry._rewrite import linkable
from scriptpool.runtime import Executor
from scriptpool.testing import EmbeddedRedis

BATCH = 250
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "abi"


def wat2wasm(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


def example(name: str, provider: str | None = None) -> bytes:
    """Our own provider or guest ``examples/abi/<name>.wat``, its provider import named ``provider``."""
    text = (EXAMPLES / f"{name}.wat").read_text()
    return wat2wasm(text.replace('"PROVIDER"', f'"{provider}"') if provider is not None else text)


API_INPUT = json.dumps({"hello": "world!", "n": 21, "arr": [1, 2, 300]}).encode()
ECHO_INPUT = json.dumps(
    {
        "cart": {
            "lines": [{"id": f"gid://shopify/CartLine/{i}", "quantity": i, "price": 9.99} for i in range(8)]
        }
    }
).encode()


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50": round(pct(samples, 0.5), 1), "p99": round(pct(samples, 0.99), 1)}


def interleave(variants: dict[str, Callable[[], float]], runs: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for round_ in range(max(1, runs // BATCH)):
        for name in order if round_ % 2 == 0 else order[::-1]:
            samples[name].extend(variants[name]() for _ in range(BATCH))
    return samples


def hot(executor: Executor, shops: dict[str, tuple[str, bytes]], runs: int) -> dict[str, Any]:
    """p50/p99 of execute per shop, with the guest's own run and instantiate medians."""
    stages: dict[str, dict[str, list[float]]] = {n: {"run": [], "instantiate": []} for n in shops}
    last: dict[str, Any] = {}

    def timed(name: str, shop: str, payload: bytes) -> float:
        t = time.perf_counter()
        result = executor.execute("bench", shop, payload)
        elapsed = (time.perf_counter() - t) * 1e6
        assert result.ok, (name, result.error)
        stages[name]["run"].append(result.report.run_ms * 1000)
        stages[name]["instantiate"].append(result.report.instantiate_ms * 1000)
        last[name] = result.report
        return elapsed

    for name, (shop, payload) in shops.items():
        for _ in range(200):
            timed(name, shop, payload)
        stages[name] = {"run": [], "instantiate": []}
    variants = {
        name: functools.partial(timed, name, shop, payload) for name, (shop, payload) in shops.items()
    }
    samples = interleave(variants, runs)
    return {
        name: {
            **summary(samples[name]),
            "instantiate_p50": round(statistics.median(stages[name]["instantiate"]), 1),
            "guest_run_p50": round(statistics.median(stages[name]["run"]), 1),
            "instructions": last[name].instructions,
            "peak_memory_bytes": last[name].peak_memory_bytes,
            "codec": last[name].codec,
        }
        for name in shops
    }


# -- glue: a Wasm module, or a C-API host function -------------------------------------------------

LOG = "shopify_function_log_new_utf8_str"


def logging_guest(calls: int) -> bytes:
    """An untrampolined guest that logs 16 bytes ``calls`` times, rewritten as deploy does."""
    return linkable(
        wat2wasm(f"""
    (module
      (import "shopify_function_v2" "{LOG}" (func $log (param i32 i32)))
      (memory (export "memory") 1)
      (data (i32.const 64) "0123456789abcdef")
      (func (export "_start") (local $i i32)
        (loop $l
          (call $log (i32.const 64) (i32.const 16))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $l (i32.lt_u (local.get $i) (i32.const {calls}))))))""")
    )


class HostGlue:
    """log_new_utf8_str as a raw wasmtime host callback: the same steps as the glue module (call
    the provider's ``_shopify_function_log_new_utf8_str``, copy the one or two segments), in
    Python on the C API. ``bind`` points it at one run's provider function and memories."""

    def __init__(self) -> None:
        self.args = (Val * 1)()
        self.results = (Val * 1)()
        self.trap = ctypes.c_void_p()
        self.func_at = self.provider_memory_at = self.guest_memory_at = 0
        self.callback = HOST_CALLBACK(self._call)

    def bind(
        self, func: wasmtime.Func, provider_memory: wasmtime.Memory, guest_memory: wasmtime.Memory
    ) -> None:
        self._keep = (func, provider_memory, guest_memory)
        self.func_at = item_address(func)
        self.provider_memory_at = item_address(provider_memory)
        self.guest_memory_at = item_address(guest_memory)

    def _call(self, env: int | None, caller: int, args: Any, count: int) -> int:
        ptr, length = args[0], args[VAL_RAW_WORDS]
        context = caller_context(caller)
        self.args[0].kind = VAL_I32
        self.args[0].of.i32 = length
        failure = func_call(
            context, self.func_at, ctypes.addressof(self.args), 1, ctypes.addressof(self.results), 1,
            ctypes.addressof(self.trap),
        )  # fmt: skip
        if failure or self.trap.value:
            raise SystemExit("provider call failed")
        ra = self.results[0].of.i32
        provider = memory_data(context, self.provider_memory_at)
        guest = memory_data(context, self.guest_memory_at)
        src, p1, l1, p2, l2 = struct.unpack("<5I", ctypes.string_at(provider + ra, 20))
        ctypes.memmove(provider + p1, guest + ptr + src, l1)
        if l2:
            ctypes.memmove(provider + p2, guest + ptr + src + l1, l2)
        return 0


def glue_per_call(calls: int, runs: int) -> dict[str, Any]:
    engine = Sandbox().engine(Limits().stack_bytes)
    provider = wasmtime.Module(engine, example("wasm_api_provider"))
    guest = wasmtime.Module(engine, logging_guest(calls))
    glue = wasmtime.Module(engine, glue_wat("shopify_function_v2", 2, (LOG,), (), MemoryLimits(1, None)))
    host = HostGlue()
    log_type = wasmtime.FuncType([wasmtime.ValType.i32(), wasmtime.ValType.i32()], [])
    setup: dict[str, list[float]] = {"glue module": [], "C-API host function": []}

    def prepare(store: wasmtime.Store) -> tuple[wasmtime.Instance, Any, Any]:
        store.set_fuel(1 << 40)
        store.set_epoch_deadline(1 << 40)
        p = wasmtime.Instance(store, provider, [])
        exports = p.exports(store)
        exports["initialize"](store, 1)
        return p, exports["memory"], exports["_shopify_function_log_new_utf8_str"]

    def with_glue() -> float:
        store = wasmtime.Store(engine)
        p, memory, log = prepare(store)
        t = time.perf_counter()
        linked = wasmtime.Instance(store, glue, [memory, log])
        g = wasmtime.Instance(
            store, guest, [linked.exports(store)[LOG], linked.exports(store)[GLUE_MEMORY_EXPORT]]
        )
        setup["glue module"].append((time.perf_counter() - t) * 1e6)
        return call(store, g, p)

    def with_host_function() -> float:
        store = wasmtime.Store(engine)
        p, memory, log = prepare(store)
        t = time.perf_counter()
        guest_memory = wasmtime.Memory(store, wasmtime.MemoryType(wasmtime.Limits(1, None)))
        func = host_func(store, log_type, host.callback)
        host.bind(log, memory, guest_memory)
        g = wasmtime.Instance(store, guest, [func, guest_memory])
        setup["C-API host function"].append((time.perf_counter() - t) * 1e6)
        return call(store, g, p)

    def call(store: wasmtime.Store, g: wasmtime.Instance, p: wasmtime.Instance) -> float:
        start = g.exports(store)["_start"]
        t = time.perf_counter()
        start(store)
        elapsed = (time.perf_counter() - t) * 1e9 / calls
        # Both copied the same bytes: the provider's ring holds the tail of what was logged.
        memory = p.exports(store)["memory"]
        out = p.exports(store)["finalize"](store)
        words = struct.unpack("<6I", memory.read(store, out, out + 24))
        logs = memory.read(store, words[2], words[2] + words[3]) + memory.read(
            store, words[4], words[4] + words[5]
        )
        assert logs == (b"0123456789abcdef" * calls)[-len(logs) :] and len(logs) == 1001, logs[-32:]
        return elapsed

    samples = interleave({"glue module": with_glue, "C-API host function": with_host_function}, runs)
    return {
        "calls_per_run": calls,
        **{
            name: {**summary(values), "setup_p50_us": round(statistics.median(setup[name]), 1)}
            for name, values in samples.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--calls", type=int, default=1000, help="log calls per run in the glue comparison")
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=secrets.token_hex(32).encode())
        sandbox = Sandbox()
        registry = Registry(redis.Redis.from_url(server.url), settings, sandbox)
        registry.define_extension_point("bench")
        registry.add_provider("shopify_functions_javy_v3", example("memory_io_provider"))
        registry.add_provider("shopify_functions_javy_v2", example("wasi_msgpack_provider"))
        registry.add_provider("shopify_function_v2", example("wasm_api_provider"))
        registry.deploy("bench", "wasi", example("wasi_echo"))
        registry.deploy("bench", "memory-io", example("memory_io_echo", "shopify_functions_javy_v3"))
        registry.deploy(
            "bench", "wasi-msgpack", example("wasi_msgpack_echo", "shopify_functions_javy_v2"), export="run"
        )
        registry.deploy("bench", "trampolined", example("wasm_api_trampolined"))
        registry.deploy("bench", "untrampolined", example("wasm_api_untrampolined"))
        executor = Executor(registry, sandbox, settings)
        out: dict[str, Any] = {"runs": args.runs, "echo_input_bytes": len(ECHO_INPUT)}
        out["hot_echo_us"] = hot(
            executor,
            {
                "WASI echo (JSON)": ("wasi", ECHO_INPUT),
                "memory-I/O echo (MessagePack)": ("memory-io", ECHO_INPUT),
                "MessagePack-over-WASI echo": ("wasi-msgpack", ECHO_INPUT),
            },
            args.runs,
        )
        out["hot_wasm_api_us"] = hot(
            executor,
            {
                "trampolined (glue in the guest)": ("trampolined", API_INPUT),
                "untrampolined (our glue module)": ("untrampolined", API_INPUT),
            },
            args.runs,
        )
        out["glue_per_call_ns"] = glue_per_call(args.calls, max(BATCH * 2, args.runs // 10))
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
