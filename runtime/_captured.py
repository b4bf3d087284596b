"""A captured run, as a worker stores it for ``scriptpool runs`` and ``replay``: everything a
replay needs to run the same module on the same input under the same limits, and what the run
gave, to compare with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from scriptpool.config.wire import ErrorInfo, ExecutionReport

# Where in a call the script ran: a single-script call, or one part of a join or chain (the
# part's own input is captured: a chain step's holds the previous output), or a join's reducer.
PART_SINGLE, PART_JOIN, PART_CHAIN, PART_REDUCER = "single", "join", "chain", "reducer"
# A record's layout; a reader skips records of a layout it does not know.
CAPTURE_FORMAT = 1


@dataclass(frozen=True, slots=True)
class CapturedRun:
    """One script's run, captured after its reply went out.

    ``input`` is the JSON the script was given (a MessagePack script got it as MessagePack);
    ``limits`` are the limits in force, after scaling (``scale_factor``) and, for a part, after
    its wall clock was cut to the caller's deadline. ``stdout`` is the raw output (what a
    successful run's output decodes from: it is not stored twice).
    """

    id: str
    captured_at: float
    ep: str
    shop_id: str
    app: str
    version: int
    sha256: str
    export: str
    codec: str
    providers: tuple[tuple[str, str], ...]  # (import-module name, provider sha256)
    part: str
    input: bytes
    limits: dict[str, int]
    scale_factor: float
    ok: bool
    error: ErrorInfo | None
    stdout: bytes
    report: ExecutionReport
    job_id: str
    worker: str
    engine: str  # the engine fingerprint it ran on: a replay on another one may count differently
    # Whether the call had a session: a SESSION write (``storeWrites``) needs one, so a replay
    # checks the writes as the worker did. Only the fact is kept, never the buyer's token.
    session: bool = False

    @property
    def status(self) -> str:
        return "ok" if self.ok else "error"

    @property
    def error_code(self) -> str | None:
        return self.error.code if self.error is not None else None

    def to_wire(self) -> dict[str, Any]:
        return {
            "format": CAPTURE_FORMAT,
            "id": self.id,
            "captured_at": self.captured_at,
            "ep": self.ep,
            "shop_id": self.shop_id,
            "app": self.app,
            "version": self.version,
            "sha256": self.sha256,
            "export": self.export,
            "codec": self.codec,
            "providers": [list(p) for p in self.providers],
            "part": self.part,
            "input": self.input,
            "limits": dict(self.limits),
            "scale_factor": self.scale_factor,
            "ok": self.ok,
            "error": None if self.error is None else self.error.to_wire(),
            "stdout": self.stdout,
            "report": self.report.to_wire(),
            "job_id": self.job_id,
            "worker": self.worker,
            "engine": self.engine,
            # Absent when false: records of runs without a session are as they were.
            **({"session": True} if self.session else {}),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> CapturedRun:
        """The run a record holds; KeyError, TypeError or ValueError if it is not one."""
        if data.get("format") != CAPTURE_FORMAT:
            raise ValueError(f"unknown capture format {data.get('format')!r}")
        error = data["error"]
        run = cls(
            id=str(data["id"]),
            captured_at=float(data["captured_at"]),
            ep=str(data["ep"]),
            shop_id=str(data["shop_id"]),
            app=str(data["app"]),
            version=int(data["version"]),
            sha256=str(data["sha256"]),
            export=str(data["export"]),
            codec=str(data["codec"]),
            providers=tuple((str(name), str(sha)) for name, sha in data["providers"]),
            part=str(data["part"]),
            input=bytes(data["input"]),
            limits={str(k): int(v) for k, v in data["limits"].items()},
            scale_factor=float(data["scale_factor"]),
            ok=bool(data["ok"]),
            error=ErrorInfo.from_wire(error) if error else None,
            stdout=bytes(data["stdout"]),
            report=ExecutionReport.from_wire(data["report"]),
            job_id=str(data["job_id"]),
            worker=str(data["worker"]),
            engine=str(data["engine"]),
            session=data.get("session") is True,
        )
        return run

    def summary(self, size: int, expires_at: float) -> dict[str, Any]:
        """What ``runs list`` shows of it, kept beside the record (no input, output or logs)."""
        return {
            "id": self.id,
            "at": self.captured_at,
            "ep": self.ep,
            "shop": self.shop_id,
            "app": self.app,
            "version": self.version,
            "status": self.status,
            "code": self.error_code,
            "instructions": self.report.instructions,
            "input_bytes": len(self.input),
            "bytes": size,
            "expires_at": expires_at,
        }

    def input_value(self) -> Any:
        """The input as a JSON value (None if it is not JSON: it may be why the run failed)."""
        try:
            return json.loads(self.input)
        except ValueError:
            return None
