"""The wasmtime engines workers run on, their fingerprint, and the epoch ticker."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import threading
import weakref

import wasmtime

# Everything here changes the machine code Cranelift emits, so it is part of the fingerprint an
# AOT artifact is compiled for. The stack size is not: wasmtime checks it at run time only
# (measured: an artifact from a 512 KiB engine loads into a 1 MiB one).
_CODEGEN = {
    "consume_fuel": True,
    "epoch_interruption": True,
    "cranelift_opt_level": "speed",
    "wasm_threads": False,
    "wasm_simd": True,
    "wasm_bulk_memory": True,
    "wasm_multi_value": True,
    "wasm_reference_types": True,
}


def _wasmtime_version() -> str:
    return importlib.metadata.version("wasmtime")


def engine_fingerprint() -> str:
    """Identify the (wasmtime version, codegen config) an AOT artifact must match."""
    blob = json.dumps({"wasmtime": _wasmtime_version(), **_CODEGEN}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def new_engine(stack_bytes: int) -> wasmtime.Engine:
    """Build an engine with our codegen settings and the given Wasm stack limit."""
    config = wasmtime.Config()
    for name, value in _CODEGEN.items():
        setattr(config, name, value)
    config.max_wasm_stack = stack_bytes
    # Deterministic guests: the same input gives the same output on every machine.
    config.cranelift_nan_canonicalization = True
    return wasmtime.Engine(config)


class EpochTicker:
    """Advances the epoch of every registered engine every ``tick_ms``, from one daemon thread.

    wasmtime-py cannot interrupt a guest from a signal handler, so the wall-clock limit is an
    epoch deadline. ctypes drops the GIL while a guest runs, so this thread gets to tick.
    """

    def __init__(self, tick_ms: int) -> None:
        self.tick_ms = tick_ms
        self._engines: weakref.WeakSet[wasmtime.Engine] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, engine: wasmtime.Engine) -> None:
        """Start ticking ``engine`` (and start the thread on first use)."""
        with self._lock:
            self._engines.add(engine)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="epoch-ticker", daemon=True)
                self._thread.start()

    def ticks_for(self, wall_ms: int) -> int:
        """Epoch ticks that cover ``wall_ms``; one extra because the first tick may come at once."""
        return -(-wall_ms // self.tick_ms) + 1

    def stop(self) -> None:
        """Stop the thread; registered engines stop advancing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        interval = self.tick_ms / 1000
        while not self._stop.wait(interval):
            with self._lock:
                engines = list(self._engines)
            for engine in engines:
                engine.increment_epoch()
