"""Where a guest's instructions go: a sampling profile, weighted by instructions (fuel).

How it samples (one sandbox run, on its own store):

* The entry export is called asynchronously (``wasmtime_func_call_async``) with a fuel yield
  interval of ``interval`` instructions: every ``interval`` instructions the guest yields, and
  wasmtime writes the fuel it used back to the store on the way out.
* After each yield the host advances the engine's epoch and resumes the guest. At its next epoch
  check (a loop header or a function entry) the guest calls our epoch-deadline callback, on its
  own stack, which asks wasmtime's guest profiler for the current Wasm stack
  (``wasmtime_guestprofiler_sample``; function names come from the module's name section) and
  weighs the sample with the fuel used since the previous one.

So samples land every ``interval`` instructions and are weighted exactly; the same run profiles
the same way every time. Fuel read in an epoch callback without a yield is stale (Cranelift
writes it back only at calls, returns and yields), which is why sampling on a wall-clock tick
would weigh samples wrongly. Once a store has a yield interval, wasmtime allows only async calls
on it, so every call of the run after the entry (a memory-I/O provider's ``finalize``) goes
through :meth:`GuestProfiler.call` too, unsampled.

The epoch callback replaces the epoch deadline's trap, so the callback itself enforces the
run's wall clock (on every tick of the sandbox's ticker, and after every yield). It never lets an
exception out: a Python exception crossing into wasmtime would crash the process.

Cost: about 5 µs per sample. Output: speedscope's own JSON (speedscope cannot read wasmtime's
Firefox-profiler output), or folded stacks (``a;b;c weight``, as function-runner writes).
"""

from __future__ import annotations

import ctypes
import json
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import wasmtime

from scriptpool.config.errors import WallClockExceeded
from scriptpool.engine._capi import (
    EPOCH_CALLBACK,
    EPOCH_FINALIZER,
    call_future_delete,
    call_future_poll,
    context_fuel_async_yield_interval,
    context_get_fuel,
    context_set_epoch_deadline,
    engine_increment_epoch,
    error_new,
    free_error,
    func_call,
    func_call_async,
    guestprofiler_delete,
    guestprofiler_read,
    guestprofiler_sample,
    guestprofiler_start,
    raise_error,
    store_epoch_deadline_callback,
)

SPEEDSCOPE_SCHEMA = "https://www.speedscope.app/file-format-schema.json"
# Samples a profile aims at when the interval is derived from a run's instruction count.
TARGET_SAMPLES = 2000
_CONTINUE = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE
_NO_FINALIZER = ctypes.cast(0, EPOCH_FINALIZER)


def interval_for(instructions: int, samples: int = TARGET_SAMPLES) -> int:
    """The sampling interval that gives about ``samples`` samples for a run this long."""
    return max(10, -(-instructions // samples))


class GuestProfiler:
    """One profiled run: give it to ``Sandbox.run(profiler=...)``, then read :attr:`stacks` and
    :attr:`weights` (or :meth:`speedscope`, :meth:`folded`). Used once."""

    def __init__(self, interval: int) -> None:
        if interval < 1:
            raise ValueError("the sampling interval is at least 1 instruction")
        self.interval = interval
        self.stacks: list[tuple[str, ...]] = []  # root first, one per sample
        self.weights: list[int] = []  # instructions per sample
        self.instructions = 0  # of the whole run, as its report counts them
        self._profiler: int = 0
        self._engine = 0
        self._store = 0
        self._armed = False
        self._sampling = False
        self._yielded = False
        self._deadline = 0.0
        self._wall_ms = 0
        self._last_fuel = 0
        self._fuel = ctypes.c_uint64(0)
        self._error = ctypes.c_void_p(None)
        self._timed_out = False
        self._failure: BaseException | None = None
        self._weights_taken: list[int] = []
        self._script = ""
        # wasmtime holds a raw pointer to this thunk for the store's life: it must live as long.
        self._thunk = EPOCH_CALLBACK(self._on_epoch)

    # -- the sandbox's side ------------------------------------------------------------------
    def attach(
        self, engine: int, store: int, modules: Sequence[tuple[str, wasmtime.Module]], wall_ms: int
    ) -> None:
        """Start profiling a run on ``store``: frames of ``modules`` (named) are recorded."""
        if self._profiler:
            raise RuntimeError("a GuestProfiler profiles one run")
        self._engine, self._store, self._wall_ms = engine, store, wall_ms
        self._script = modules[0][0]
        self._profiler = guestprofiler_start(engine, "scriptpool", self.interval, modules)

    def call(
        self,
        context: int,
        func: int,
        args: int | None,
        nargs: int,
        results: int | None,
        nresults: int,
        trap_at: int,
        *,
        entry: bool,
    ) -> int | None:
        """Call ``func`` as ``wasmtime_func_call`` would (the trap at ``trap_at``, the error
        returned): the ``entry`` asynchronously and sampled, and every call after it
        asynchronously (the store takes no other calls then); calls before it as usual."""
        if not self._armed:
            if not entry:  # a provider's initialize: the store is not async yet
                return int(func_call(context, func, args, nargs, results, nresults, trap_at) or 0) or None
            raise_error(context_fuel_async_yield_interval(context, self.interval))
            store_epoch_deadline_callback(self._store, self._thunk, None, _NO_FINALIZER)
            self._armed = True
        if entry:
            context_get_fuel(context, ctypes.addressof(self._fuel))
            self._last_fuel = self._fuel.value
            self._deadline = time.monotonic() + self._wall_ms / 1000
            self._sampling = True
            context_set_epoch_deadline(context, 1)  # the callback from the next epoch on
        self._error.value = None
        future = func_call_async(
            context, func, args, nargs, results, nresults, trap_at, ctypes.addressof(self._error)
        )
        try:
            while not call_future_poll(future):
                if entry:
                    self._yielded = True
                    engine_increment_epoch(self._engine)
        finally:
            call_future_delete(future)
            self._sampling = False
        failure = self._error.value
        if self._failure is not None:
            free_error(failure)
            raise RuntimeError(f"the profiler failed: {self._failure!r}") from self._failure
        if self._timed_out:
            free_error(failure)
            raise WallClockExceeded("script ran past its wall-clock deadline")
        return failure

    def finish(self, instructions: int) -> None:
        """The run is over (``instructions`` long): read the samples' stacks."""
        self.instructions = instructions
        pointer, self._profiler = self._profiler, 0
        if not pointer:
            return
        stacks = _stacks(json.loads(guestprofiler_read(pointer)), self._script)
        # One stack per sample() call, in order; a sample with no frames of ours is dropped.
        kept = [(s, w) for s, w in zip(stacks, self._weights_taken, strict=True) if s]
        self.stacks = [s for s, _ in kept]
        self.weights = [w for _, w in kept]

    def abandon(self) -> None:
        """Free the profiler without reading it (the run failed before its entry, say)."""
        pointer, self._profiler = self._profiler, 0
        if pointer:
            guestprofiler_delete(pointer)

    def _on_epoch(self, context: int, _data: Any, delta: Any, kind: Any) -> int:
        # Runs on the guest's stack, inside wasmtime: nothing may escape it (see the module doc).
        try:
            delta[0] = 1
            kind[0] = _CONTINUE
            if not self._sampling:
                return 0
            if time.monotonic() > self._deadline:
                self._timed_out = True
                return _error("scriptpool: wall-clock limit")
            if self._yielded:
                self._yielded = False
                context_get_fuel(context, ctypes.addressof(self._fuel))
                guestprofiler_sample(self._profiler, self._store, 0)
                self._weights_taken.append(self._last_fuel - self._fuel.value)
                self._last_fuel = self._fuel.value
            return 0
        except BaseException as exc:
            self._failure = exc
            return _error("scriptpool: profiler callback failed")

    # -- what it found -----------------------------------------------------------------------
    @property
    def unsampled(self) -> int:
        """Instructions no sample covers: instantiation, and the tail after the last sample."""
        return max(0, self.instructions - sum(self.weights))

    def self_weights(self) -> Counter[str]:
        """Instructions per function, spent in the function itself (its own frames on top)."""
        found: Counter[str] = Counter()
        for stack, weight in zip(self.stacks, self.weights, strict=True):
            found[stack[-1]] += weight
        return found

    def speedscope(self, name: str) -> dict[str, Any]:
        """The profile as speedscope's own file format: one sampled profile, weights in
        instructions."""
        frames: list[dict[str, str]] = []
        index: dict[str, int] = {}
        samples: list[list[int]] = []
        for stack in self.stacks:
            row = []
            for frame in stack:
                if frame not in index:
                    index[frame] = len(frames)
                    frames.append({"name": frame})
                row.append(index[frame])
            samples.append(row)
        total = sum(self.weights)
        return {
            "$schema": SPEEDSCOPE_SCHEMA,
            "name": name,
            "exporter": "scriptpool",
            "activeProfileIndex": 0,
            "shared": {"frames": frames},
            "profiles": [
                {
                    "type": "sampled",
                    "name": f"{name} (weights: Wasm instructions, a sample every {self.interval:,})",
                    "unit": "none",
                    "startValue": 0,
                    "endValue": total,
                    "samples": samples,
                    "weights": list(self.weights),
                }
            ],
        }

    def folded(self) -> str:
        """The profile as folded stacks, one ``root;...;leaf instructions`` line per stack."""
        summed: Counter[str] = Counter()
        for stack, weight in zip(self.stacks, self.weights, strict=True):
            summed[";".join(stack)] += weight
        return "".join(f"{stack} {weight}\n" for stack, weight in sorted(summed.items()))


def _error(message: str) -> int:
    """A ``wasmtime_error_t*`` to return from the callback, which traps the guest."""
    return int(error_new(message.encode()) or 0)


def _stacks(profile: dict[str, Any], script: str) -> list[tuple[str, ...]]:
    """Each sample's stack, root first, from wasmtime's Firefox-profiler JSON. Frames of the
    script are its function names; frames of another module (a provider) carry its name."""
    thread = profile["threads"][0]
    strings = thread["stringArray"] if "stringArray" in thread else profile["shared"]["stringArray"]
    frame_of, prefix_of = thread["stackTable"]["frame"], thread["stackTable"]["prefix"]
    func_of = thread["frameTable"]["func"]
    names, resources = thread["funcTable"]["name"], thread["funcTable"]["resource"]
    resource_names = thread["resourceTable"]["name"]
    out: list[tuple[str, ...]] = []
    for stack in thread["samples"]["stack"]:
        frames: list[str] = []
        while stack is not None:
            func = func_of[frame_of[stack]]
            name = strings[names[func]]
            resource = resources[func]
            module = strings[resource_names[resource]] if resource is not None and resource >= 0 else script
            frames.append(name if module == script else f"{module}::{name}")
            stack = prefix_of[stack]
        out.append(tuple(reversed(frames)))
    return out
