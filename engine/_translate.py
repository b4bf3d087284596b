"""What a failed run is reported as: wasmtime's traps and errors, a guest's exit, and a
provider's failed stage, translated into the named errors of ``scriptpool.config.errors``.

Only the sandbox's run paths (``engine/_run.py``, ``engine/_linked.py``) call this, and only once
a step has failed: none of it is on the path of a run that succeeds.
"""

from __future__ import annotations

from collections.abc import Iterable

import wasmtime

from scriptpool.config import Limits
from scriptpool.config.errors import (
    ExecutionError,
    GuestRuntimeError,
    InstructionLimitExceeded,
    InvalidModule,
    MemoryLimitExceeded,
    StackOverflow,
    WallClockExceeded,
)
from scriptpool.engine._capi import trap_code, trap_code_name
from scriptpool.engine._wasi import GuestExit

# memory.grow fails silently (returns -1) at the store limit, so a guest that then traps or
# exits non-zero is reported as out of memory when it stands within this much of its limit.
# 1 MiB covers the growth step of common allocators (dlmalloc, AssemblyScript's TLSF). Under a
# small limit the slack is a quarter of it, or every trap under a 1 MiB limit would count.
MEMORY_EXHAUSTION_SLACK = 1024 * 1024


def memory_exhaustion_slack(limit_bytes: int) -> int:
    """How close to its memory limit a failing guest must be to count as out of memory."""
    return min(MEMORY_EXHAUSTION_SLACK, limit_bytes // 4)


class Stage(Exception):
    """A provider's step failed (``stage`` is instantiate, initialize or finalize): the error
    is reported with the stage in its detail."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(stage)
        self.stage = stage
        self.cause = cause


def one_line(exc: Exception) -> str:
    """wasmtime's messages span lines ("Caused by:" chains); errors we report are one line."""
    parts = [line.strip() for line in str(exc).splitlines()]
    return ": ".join(p for p in parts if p and p != "Caused by:")


def translate(
    exc: BaseException, modules: Iterable[wasmtime.Module], limits: Limits
) -> ExecutionError | None:
    """What a failed step of a run is reported as: None for ``proc_exit(0)``, which is success
    (anything unexpected is a bug, and raised)."""
    if isinstance(exc, Stage):
        error = translate(exc.cause, modules, limits)
        if error is None:
            error = GuestRuntimeError(f"provider exited during {exc.stage}", exit_code=0)
        error.detail["stage"] = exc.stage
        return error
    if isinstance(exc, GuestExit):
        if exc.code == 0:
            return None
        return GuestRuntimeError(f"script exited with code {exc.code}", exit_code=exc.code)
    if isinstance(exc, ExecutionError):
        return exc
    if isinstance(exc, InvalidModule):
        return GuestRuntimeError(str(exc))
    if isinstance(exc, wasmtime.Trap):
        return _translate_trap(exc)
    if isinstance(exc, wasmtime.WasmtimeError):
        if _GC_HEAP_EXHAUSTED in str(exc):
            return MemoryLimitExceeded(
                f"script ran out of GC heap (limit {limits.memory_bytes} bytes)",
                limit=limits.memory_bytes,
                trap_code="gc_heap_out_of_memory",
            )
        return _translate_instantiation(exc, modules, limits)
    raise exc


# wasmtime gives these two failures no code of their own, only a message: matched here alone.
_GC_HEAP_EXHAUSTED = "GC heap out of memory"
_UNCAUGHT_EXCEPTION = "thrown Wasm exception"


def out_of_memory(error: ExecutionError | None, peak: int, limits: Limits) -> ExecutionError | None:
    """A runtime error of a guest standing near its memory limit is reported as out of memory."""
    near_limit = peak + memory_exhaustion_slack(limits.memory_bytes) > limits.memory_bytes
    if isinstance(error, GuestRuntimeError) and near_limit:
        return MemoryLimitExceeded(
            f"script ran out of memory at {peak} bytes (limit {limits.memory_bytes})",
            limit=limits.memory_bytes,
            **error.detail,
        )
    return error


def _translate_trap(trap: wasmtime.Trap) -> ExecutionError:
    code = trap_code(trap)
    if code == wasmtime.TrapCode.OUT_OF_FUEL.value:
        return InstructionLimitExceeded("script used up its instruction budget")
    if code == wasmtime.TrapCode.INTERRUPT.value:
        return WallClockExceeded("script ran past its wall-clock deadline")
    if code == wasmtime.TrapCode.STACK_OVERFLOW.value:
        return StackOverflow("script exhausted its Wasm stack")
    if code is None and _UNCAUGHT_EXCEPTION in str(trap):
        return GuestRuntimeError(
            "script threw a Wasm exception that it did not catch", trap_code="uncaught_exception"
        )
    name = trap_code_name(code) if code is not None else "unknown"
    return GuestRuntimeError(f"script trapped: {name}", trap_code=name)


def _translate_instantiation(
    exc: wasmtime.WasmtimeError, modules: Iterable[wasmtime.Module], limits: Limits
) -> ExecutionError:
    declared = max((_declared_memory_bytes(m) for m in modules), default=0)
    if declared > limits.memory_bytes:
        return MemoryLimitExceeded(
            f"module declares {declared} bytes of memory (limit {limits.memory_bytes})",
            limit=limits.memory_bytes,
        )
    return GuestRuntimeError(f"script failed to start: {one_line(exc)}", trap_code="instantiation")


def _declared_memory_bytes(module: wasmtime.Module) -> int:
    """The largest initial size of a memory the module exports or imports: the limit holds for
    each memory on its own."""
    types = [e.type for e in module.exports] + [i.type for i in module.imports]
    pages = [t.limits.min for t in types if isinstance(t, wasmtime.MemoryType)]
    return max(pages, default=0) * 65536
