"""The project's error hierarchy: one base error, a subtree per subsystem.

Every error carries a stable ``code`` that outcomes and logs report. Codes never change once
published; messages may. Two class attributes say what a code means to a caller:
``trips_breaker`` (the pool did not answer, or not in time: the (shop, EP) circuit breaker
counts it; an error a script gives for one input, however often, is an answer and does not) and
``fallback`` (the pool did not answer: the outcome's status is ``fallback``). No other module
spells a code: it names the class.
"""

from __future__ import annotations

from functools import cache
from typing import Any, ClassVar

__all__ = [
    "ArtifactRejected",
    "BrokerUnavailable",
    "CircuitOpen",
    "ClientClosed",
    "ConfigurationError",
    "DataNotFound",
    "DeadlineExceeded",
    "ExecutionError",
    "ExtensionPointInUse",
    "ForbiddenImport",
    "GuestRuntimeError",
    "InputTooLarge",
    "InstructionLimitExceeded",
    "InvalidArgument",
    "InvalidInput",
    "InvalidInputQuery",
    "InvalidModule",
    "InvalidOutput",
    "InvalidReply",
    "MemoryLimitExceeded",
    "ModuleTooComplex",
    "ModuleTooLarge",
    "NotReplicated",
    "NothingToRollBack",
    "OutputTooLarge",
    "PoolError",
    "ProviderNotFound",
    "QuotaExceeded",
    "RegistryError",
    "RolloutConflict",
    "RunNotFound",
    "ScriptNotFound",
    "ScriptpoolError",
    "ShardNotDrained",
    "StackOverflow",
    "StoreLimitExceeded",
    "TooManyApps",
    "UnknownExtensionPoint",
    "WallClockExceeded",
    "WorkerFailed",
    "error_class_for",
]


class ScriptpoolError(Exception):
    """Raised when anything in scriptpool fails; the base of every error the project raises."""

    code: ClassVar[str] = "scriptpool_error"
    trips_breaker: ClassVar[bool] = False
    fallback: ClassVar[bool] = False

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.detail))


def _rebuild(cls: type[ScriptpoolError], message: str, detail: dict[str, Any]) -> ScriptpoolError:
    return cls(message, **detail)


class InvalidArgument(ScriptpoolError):
    """Raised when a caller passes a malformed name, id, timeout or similar argument."""

    code = "invalid_argument"


class ConfigurationError(ScriptpoolError):
    """Raised when settings are missing or malformed."""

    code = "configuration_error"


# -- deploy and lookup --------------------------------------------------------------------------


class RegistryError(ScriptpoolError):
    """Raised when a deploy, rollback or lookup in the registry fails."""

    code = "registry_error"


class InvalidModule(RegistryError):
    """Raised when deployed bytes are not a valid WebAssembly module for our ABI."""

    code = "invalid_module"


class ModuleTooLarge(InvalidModule):
    """Raised when a deployed module exceeds the module size limit."""

    code = "module_too_large"


class ModuleTooComplex(InvalidModule):
    """Raised when a module is over a structural cap (functions, locals, nesting, loops, ...), or
    its compilation needs more time or memory than its bound allows: at deploy, and on a
    worker that must compile it for a job. ``detail`` names the ``measure`` (or the ``bound``:
    ``time`` or ``memory``) with its ``value`` and ``cap``."""

    code = "module_too_complex"


class ForbiddenImport(InvalidModule):
    """Raised when a module imports something outside the allowlist (our WASI subset and providers)."""

    code = "forbidden_import"


class InvalidInputQuery(RegistryError):
    """Raised when a script's GraphQL input query cannot be used with its extension point's
    input schema: it does not parse, fails validation against the schema (an unknown field, a
    wrong argument, ...), is not one query operation, or is over the EP's size or cost cap.
    ``detail`` holds the ``problem`` and its ``line`` and ``column`` in the query (1-based)."""

    code = "invalid_input_query"


class ScriptNotFound(RegistryError):
    """Raised when no script is bound to an (extension point, shop) pair."""

    code = "script_not_found"


class UnknownExtensionPoint(RegistryError):
    """Raised when an extension point has not been defined in the registry."""

    code = "unknown_extension_point"


class ProviderNotFound(RegistryError):
    """Raised when a provider named by a module's imports is not installed."""

    code = "provider_not_found"


class TooManyApps(RegistryError):
    """Raised when a deploy would bind more apps' scripts to one (EP, shop) than its extension
    point allows (one for a single EP, 25 for a join or chain)."""

    code = "too_many_apps"


class RolloutConflict(RegistryError):
    """Raised when a rollout is started at an (EP, shop) that already has one under way."""

    code = "rollout_in_progress"


class ExtensionPointInUse(RegistryError):
    """Raised when a redefinition would change how the scripts bound at an extension point
    combine (its ``combine`` mode) and apps are bound there, unless it is forced."""

    code = "extension_point_in_use"


class NothingToRollBack(RegistryError):
    """Raised when a rollback is asked for but the version it would bind is not kept (no
    earlier one, or not the version named)."""

    code = "nothing_to_roll_back"


class NotReplicated(RegistryError):
    """Raised when a write (a deploy, rollback or definition) reached the primary but fewer
    replicas than required acknowledged it in time: it is live, but not known to survive a
    failover. ``detail`` holds ``acknowledged``, ``required``, ``timeout_ms`` and ``group``."""

    code = "not_replicated"


class RunNotFound(RegistryError):
    """Raised when a captured run is not in the store: never captured, evicted, expired, or
    unreadable."""

    code = "run_not_found"


class DataNotFound(RegistryError):
    """Raised when a data key asked for (``scriptpool data get``) is not stored in its scope;
    ``detail`` names the ``app``, ``scope``, ``shop`` and ``key``."""

    code = "data_not_found"


class ArtifactRejected(RegistryError):
    """Raised when a stored AOT artifact fails its signature or fingerprint check."""

    code = "artifact_rejected"


# -- execution ----------------------------------------------------------------------------------


class ExecutionError(ScriptpoolError):
    """Raised when running a script fails: a limit, a guest fault or bad input or output."""

    code = "execution_error"


class InvalidInput(ExecutionError):
    """Raised when the input is not JSON-serialisable or fails the extension point's schema."""

    code = "invalid_input"


class InputTooLarge(ExecutionError):
    """Raised when the serialised input exceeds the input limit."""

    code = "input_too_large"


class InstructionLimitExceeded(ExecutionError):
    """Raised when a guest exhausts its instruction (fuel) budget."""

    code = "instruction_limit_exceeded"


class MemoryLimitExceeded(ExecutionError):
    """Raised when a guest needs more linear memory than its limit allows."""

    code = "memory_limit_exceeded"


class StackOverflow(ExecutionError):
    """Raised when a guest exhausts its Wasm stack."""

    code = "stack_overflow"


class WallClockExceeded(ExecutionError):
    """Raised when a guest runs past its wall-clock deadline (epoch interruption). Unlike the
    other limits it depends on the worker's load, not only on the input, so the breaker counts it."""

    code = "wall_clock_exceeded"
    trips_breaker = True


class GuestRuntimeError(ExecutionError):
    """Raised when a guest traps or exits non-zero; ``detail`` holds ``trap_code`` or ``exit_code``."""

    code = "runtime_error"


class InvalidOutput(ExecutionError):
    """Raised when guest output is not UTF-8, not JSON, or fails the output schema."""

    code = "invalid_output"


class OutputTooLarge(ExecutionError):
    """Raised when a guest writes more to stdout than the output limit."""

    code = "output_too_large"


class StoreLimitExceeded(ExecutionError):
    """Raised when a data write passes a store limit (``scriptpool.config.store``): a key too long
    or not printable, a value too large, too deep or not JSON, too many keys in a scope, too many
    bytes for a shop, too many writes in a run. ``detail`` names ``limit``, ``scope`` and ``key``.
    Nothing of the refused call is written."""

    code = "store_limit_exceeded"


# -- the pool (enqueue and await) -----------------------------------------------------------------


class PoolError(ScriptpoolError):
    """Raised (only with ``strict=True``) when the pool could not answer: the caller got a fallback."""

    code = "pool_error"


class DeadlineExceeded(PoolError):
    """Raised when no reply arrived before the caller's deadline."""

    code = "timeout"
    trips_breaker = True
    fallback = True


class CircuitOpen(PoolError):
    """Raised when the (shop, EP) circuit breaker is open, so nothing was enqueued."""

    code = "circuit_open"
    fallback = True


class QuotaExceeded(PoolError):
    """Raised when the shop (or one of its apps) is over its quota or its fair share of a busy shard:
    the worker refused the call without running it, and the caller got its fallback at once."""

    code = "quota_exceeded"
    fallback = True


class ClientClosed(PoolError):
    """Raised (only with ``strict=True``) when a call is made on a client after its ``close()``:
    nothing is enqueued, and the caller gets its fallback at once instead of at its deadline."""

    code = "client_closed"
    fallback = True


class BrokerUnavailable(PoolError):
    """Raised when the job could not be enqueued because Redis is unreachable."""

    code = "broker_unavailable"
    trips_breaker = True
    fallback = True


class WorkerFailed(PoolError):
    """Raised when a worker failed outside the script, e.g. it lost Redis during the lookup."""

    code = "worker_error"
    trips_breaker = True


class InvalidReply(WorkerFailed):
    """Raised when the reply to a call cannot be read: not one a worker sends (wrong types,
    missing fields), so whoever wrote it to the reply list is broken or hostile."""

    code = "invalid_reply"


# -- operations -----------------------------------------------------------------------------------


class ShardNotDrained(ScriptpoolError):
    """Raised when ``scriptpool shard drain`` finds the shard's old queue still in use when its
    time is up: some client still publishes there with the old shard map."""

    code = "shard_not_drained"


def _all_subclasses(cls: type[ScriptpoolError]) -> list[type[ScriptpoolError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_subclasses(sub))
    return found


@cache
def error_class_for(code: str) -> type[ScriptpoolError]:
    """Return the error class that owns ``code`` (the base class for an unknown code)."""
    for cls in _all_subclasses(ScriptpoolError):
        if cls.code == code:
            return cls
    return ScriptpoolError
