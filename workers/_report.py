"""What one execution returns: status, output, a named error and the execution report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from config.errors import ScriptpoolError


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A named error as data: the stable ``code``, a message and structured detail."""

    code: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: ScriptpoolError) -> ErrorInfo:
        return cls(exc.code, exc.message, dict(exc.detail))


@dataclass(frozen=True, slots=True)
class ExecutionReport:
    """Costs of one run, like Shopify's function-runner: resources used and time per stage."""

    instructions: int = 0
    peak_memory_bytes: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    logs: str = ""
    lookup_ms: float = 0.0
    instantiate_ms: float = 0.0
    run_ms: float = 0.0
    decode_ms: float = 0.0
    module_source: str = ""  # "hot", "deserialized" or "compiled"
    sha256: str = ""
    version: int = 0


@dataclass(frozen=True, slots=True)
class Execution:
    """The result of running one script: output on success, a named error otherwise."""

    ok: bool
    output: Any
    error: ErrorInfo | None
    report: ExecutionReport

    @property
    def status(self) -> str:
        return "ok" if self.ok else "error"

    def to_dict(self) -> dict[str, Any]:
        """The wire form: what ``dataclasses.asdict`` gives (a test holds them equal), written out
        because ``asdict`` deep-copies recursively and cost about 20 µs per execution. ``output``
        is shared, not copied: it was decoded for this execution and nothing else holds it."""
        error = self.error
        report = self.report
        return {
            "ok": self.ok,
            "output": self.output,
            "error": None
            if error is None
            else {"code": error.code, "message": error.message, "detail": dict(error.detail)},
            "report": {
                "instructions": report.instructions,
                "peak_memory_bytes": report.peak_memory_bytes,
                "input_bytes": report.input_bytes,
                "output_bytes": report.output_bytes,
                "logs": report.logs,
                "lookup_ms": report.lookup_ms,
                "instantiate_ms": report.instantiate_ms,
                "run_ms": report.run_ms,
                "decode_ms": report.decode_ms,
                "module_source": report.module_source,
                "sha256": report.sha256,
                "version": report.version,
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Execution:
        error = data.get("error")
        return cls(
            ok=data["ok"],
            output=data.get("output"),
            error=ErrorInfo(**error) if error else None,
            report=ExecutionReport(**data.get("report", {})),
        )
