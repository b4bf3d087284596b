"""What host code gets back from every run: never an exception unless it asked for one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scriptpool.config.errors import ScriptpoolError, error_class_for
from scriptpool.config.wire import ErrorInfo, ExecutionReport, Part

OK, ERROR, FALLBACK = "ok", "error", "fallback"


@dataclass(frozen=True, slots=True)
class Timings:
    """Where one call's time went, in milliseconds: the report's stages, caller side and worker side."""

    validate_ms: float = 0.0
    serialize_ms: float = 0.0
    enqueue_ms: float = 0.0
    queue_wait_ms: float = 0.0
    execute_ms: float = 0.0
    result_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to one ``Client.run``.

    ``status`` is ``ok`` (``output`` is the script's), ``error`` (the script failed with a named
    error; ``output`` is the fallback) or ``fallback`` (the pool did not answer in time, or the
    breaker is open; ``output`` is the fallback). ``output`` is always safe to use.
    """

    status: str
    output: Any
    error_code: str | None = None
    error: ErrorInfo | None = None
    report: ExecutionReport | None = None
    timings: Timings = Timings()
    shard: int | None = None
    worker: str | None = None
    job_id: str | None = None
    # With several apps' scripts at the EP (a join or chain), one entry per app: its version,
    # status, error and report; empty otherwise.
    parts: tuple[Part, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == OK

    def raise_for_status(self) -> Outcome:
        """Raise the named error this outcome carries (``strict=True`` does this for you)."""
        if self.ok:
            return self
        code = self.error_code or ScriptpoolError.code
        message = self.error.message if self.error else code
        detail = dict(self.error.detail) if self.error else {}
        exc: ScriptpoolError = error_class_for(code)(message, **detail)
        exc.outcome = self  # type: ignore[attr-defined]
        raise exc

    def to_dict(self) -> dict[str, Any]:
        """The outcome as plain data, for JSON. The output (a script's, or the fallback) is passed
        as it is: ``dataclasses.asdict`` copied it recursively, and a script's data must never
        drive the host's recursion."""
        return {
            "status": self.status,
            "output": self.output,
            "error_code": self.error_code,
            "error": None if self.error is None else self.error.to_wire(),
            "report": None if self.report is None else self.report.to_wire(),
            "timings": {name: getattr(self.timings, name) for name in Timings.__slots__},
            "shard": self.shard,
            "worker": self.worker,
            "job_id": self.job_id,
            "parts": [part.to_wire() for part in self.parts],
        }
