"""What crosses the queue: the job a caller enqueues and the reply a worker sends back."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from config.errors import InvalidInput

TASK_NAME = "scriptpool.execute"


def encode_input(value: Any) -> bytes:
    """Serialise host input once, to the JSON bytes a guest reads on stdin (bytes pass as-is)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"input is not JSON-serialisable: {exc}") from None


@dataclass(frozen=True, slots=True)
class Job:
    """One execution request. ``deadline`` is the caller's absolute give-up time (Unix seconds)."""

    id: str
    ep: str
    shop_id: str
    input: bytes  # JSON text, serialised once by the caller
    deadline: float
    enqueued_at: float

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Job:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Reply:
    """A worker's answer to one job: the execution (as a dict) and where and when it ran."""

    job_id: str
    execution: dict[str, Any] | None
    error: dict[str, Any] | None  # set when the worker itself failed (e.g. Redis lost mid-lookup)
    shard: int
    worker: str
    received_at: float
    finished_at: float

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Reply:
        return cls(**data)
