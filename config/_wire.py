"""What crosses the queue, in both directions, and its one encoding and decoding.

The caller enqueues a :class:`Job` inside a Celery protocol-2 message (the envelope constants are
here too: the client writes the envelope, the worker checks it); the worker answers with a
:class:`Reply` carrying an :class:`Execution`, or a :class:`Taken` ahead of a batch's replies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from config.errors import InvalidInput, ScriptpoolError

# The envelope kombu's Redis transport writes for a msgpack task message; workers accept no other.
CONTENT_TYPE = "application/x-msgpack"
CONTENT_ENCODING = "binary"
BODY_ENCODING = "base64"


def redis_command(*parts: bytes | str) -> bytes:
    """One Redis command in RESP, for the hot paths that write to a connection directly.

    redis-py's ``execute_command`` costs about 40 us of CPU per command here (argument packing,
    retry and observability wrappers), several times the command itself; the enqueue and reply
    paths send packed commands on a pooled ``redis.Connection`` instead (16 to 30 us).
    """
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def encode_input(value: Any) -> bytes:
    """Serialise host input once, to the JSON bytes a guest reads on stdin (bytes pass as-is).

    Minified, with ``/``, U+2028 and U+2029 escaped as Shopify's production JSON writes them, so a
    module that looks at its input's bytes (or counts them against the input limit) sees what it
    would see there. All three can only occur inside strings, so replacing them in the text is safe.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        text = text.replace("/", "\\/").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
        return text.encode()  # a lone surrogate fails here: a UnicodeEncodeError is a ValueError
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"input is not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise InvalidInput("input is nested too deeply to serialise") from None


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
        # Not dataclasses.asdict: that deep-copies, and this runs once per call.
        return {
            "id": self.id,
            "ep": self.ep,
            "shop_id": self.shop_id,
            "input": self.input,
            "deadline": self.deadline,
            "enqueued_at": self.enqueued_at,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Job:
        """The job a message carries; ``ValueError`` naming what is wrong if it is not one (our
        client never sends such a job, but anyone who can write to Redis can)."""
        if not isinstance(data, dict):
            raise ValueError(f"a job is a map, got {type(data).__name__}")
        try:
            job = cls(**data)
        except TypeError as exc:
            raise ValueError(f"not a job: {exc}") from None
        if not (
            type(job.id) is str
            and type(job.ep) is str
            and type(job.shop_id) is str
            and type(job.input) is bytes
            and type(job.deadline) is float
            and type(job.enqueued_at) is float
        ):
            raise ValueError("a job's fields have the wrong types")
        return job


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A named error as data: the stable ``code``, a message and structured detail."""

    code: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: ScriptpoolError) -> ErrorInfo:
        return cls(exc.code, exc.message, dict(exc.detail))

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": dict(self.detail)}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ErrorInfo:
        return cls(data["code"], data["message"], data.get("detail") or {})


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
    codec: str = ""  # what the script reads and writes: "json" or "msgpack" (output decoded to JSON)
    # During a rollout: which version served the call, "live" or the candidate's "canary", and
    # the rollout's id.
    rollout: str = ""
    rollout_id: str = ""
    # How much the EP's scale rules raised the instruction, input and output limits (1: not at all).
    scale_factor: float = 1.0

    def to_wire(self) -> dict[str, Any]:
        # Written out: dataclasses.asdict deep-copies recursively (a test holds the two equal).
        return {
            "instructions": self.instructions,
            "peak_memory_bytes": self.peak_memory_bytes,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "logs": self.logs,
            "lookup_ms": self.lookup_ms,
            "instantiate_ms": self.instantiate_ms,
            "run_ms": self.run_ms,
            "decode_ms": self.decode_ms,
            "module_source": self.module_source,
            "sha256": self.sha256,
            "version": self.version,
            "codec": self.codec,
            "rollout": self.rollout,
            "rollout_id": self.rollout_id,
            "scale_factor": self.scale_factor,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ExecutionReport:
        # A field this version does not know (a newer worker's) is left out, not an error.
        return cls(**{k: v for k, v in data.items() if k in _REPORT_FIELDS})


_REPORT_FIELDS = frozenset(ExecutionReport.__dataclass_fields__)


# A part's status: it ran and succeeded, it failed with its named error, or it never ran.
PART_OK, PART_ERROR, PART_SKIPPED = "ok", "error", "skipped"


@dataclass(frozen=True, slots=True)
class Part:
    """One app's script in a call that runs several (a join or chain extension point): which
    version ran, how it went, and its own report. ``skipped`` parts never ran: the call's
    deadline was too near, or a blocking part had already failed."""

    app: str
    version: int
    status: str
    error: ErrorInfo | None
    report: ExecutionReport

    def to_wire(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "version": self.version,
            "status": self.status,
            "error": None if self.error is None else self.error.to_wire(),
            "report": self.report.to_wire(),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Part:
        error = data.get("error")
        return cls(
            app=data["app"],
            version=data["version"],
            status=data["status"],
            error=ErrorInfo.from_wire(error) if error else None,
            report=ExecutionReport.from_wire(data.get("report") or {}),
        )


@dataclass(frozen=True, slots=True)
class Execution:
    """The result of running a call's script (or scripts): output on success, a named error
    otherwise; with several apps' scripts, one :class:`Part` per app."""

    ok: bool
    output: Any
    error: ErrorInfo | None
    report: ExecutionReport
    parts: tuple[Part, ...] = ()

    @property
    def status(self) -> str:
        return "ok" if self.ok else "error"

    def to_wire(self) -> dict[str, Any]:
        """The wire form: what ``dataclasses.asdict`` gives (a test holds them equal), written out
        because ``asdict`` deep-copies recursively and cost about 20 µs per execution. ``output``
        is shared, not copied: it was decoded for this execution and nothing else holds it."""
        return {
            "ok": self.ok,
            "output": self.output,
            "error": None if self.error is None else self.error.to_wire(),
            "report": self.report.to_wire(),
            "parts": tuple(part.to_wire() for part in self.parts),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Execution:
        error = data.get("error")
        return cls(
            ok=data["ok"],
            output=data.get("output"),
            error=ErrorInfo.from_wire(error) if error else None,
            report=ExecutionReport.from_wire(data.get("report") or {}),
            parts=tuple(Part.from_wire(part) for part in data.get("parts") or ()),
        )


@dataclass(frozen=True, slots=True)
class Reply:
    """A worker's answer to one job: the execution, or the worker's own failure (``error``, e.g.
    Redis lost mid-lookup), and where and when it ran."""

    job_id: str
    execution: Execution | None
    error: ErrorInfo | None
    shard: int
    worker: str
    received_at: float
    finished_at: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "execution": None if self.execution is None else self.execution.to_wire(),
            "error": None if self.error is None else self.error.to_wire(),
            "shard": self.shard,
            "worker": self.worker,
            "received_at": self.received_at,
            "finished_at": self.finished_at,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Reply:
        execution, error = data.get("execution"), data.get("error")
        return cls(
            job_id=data["job_id"],
            execution=Execution.from_wire(execution) if execution is not None else None,
            error=ErrorInfo.from_wire(error) if error is not None else None,
            shard=data["shard"],
            worker=data["worker"],
            received_at=data["received_at"],
            finished_at=data["finished_at"],
        )


@dataclass(frozen=True, slots=True)
class Taken:
    """A worker's word that it took a message, sent ahead of the replies when the message asks
    (``announce``): the client then publishes the calls that piled up behind it. It names the
    message by its first job."""

    job_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "taken": True}

    @staticmethod
    def is_taken(data: dict[str, Any]) -> bool:
        """Whether a decoded reply-list item is a :class:`Taken` rather than a :class:`Reply`."""
        return bool(data.get("taken", False))
