"""What one execution returns: status, output, a named error and the execution report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Execution:
        error = data.get("error")
        return cls(
            ok=data["ok"],
            output=data.get("output"),
            error=ErrorInfo(**error) if error else None,
            report=ExecutionReport(**data.get("report", {})),
        )
