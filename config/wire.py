"""What crosses the queue, in both directions, and its one encoding and decoding.

The caller enqueues a :class:`Job` inside a Celery protocol-2 message (the envelope constants are
here too: the client writes the envelope, the worker checks it); the worker answers with a
:class:`Reply` carrying an :class:`Execution`, or a :class:`Taken` ahead of a batch's replies.

Public as ``scriptpool.config.wire`` rather than names of ``scriptpool.config``: only the two ends
of the queue (producer and workers, and what runs a script for them) use these, and
``from scriptpool.config.wire import Job, Reply`` says which side of the core a module touches.

Long on purpose (past 450 lines): every type on the wire, with the checks that decode it from a
hostile message, in one file, so the two ends cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from scriptpool.config.errors import InvalidInput, ScriptpoolError

__all__ = [
    "BODY_ENCODING",
    "CONTENT_ENCODING",
    "CONTENT_TYPE",
    "MAX_OUTPUT_DEPTH",
    "MAX_SESSION_CHARS",
    "PART_ERROR",
    "PART_OK",
    "PART_SKIPPED",
    "ErrorInfo",
    "Execution",
    "ExecutionReport",
    "Job",
    "Part",
    "Reply",
    "Taken",
    "encode_input",
    "nested_deeper_than",
    "query_digest",
    "redis_command",
    "valid_session",
]

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


def query_digest(text: str) -> str:
    """How a job and a report name an input query: the sha256 of its UTF-8 text, in hex."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# How deeply a script's output may nest arrays and objects: serde_json's recursion limit, which
# function-runner parses output with. Workers refuse deeper output (``invalid_output``) and
# clients deeper replies, so host code never gets data it would recurse on without end.
MAX_OUTPUT_DEPTH = 128


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and dicts more than ``limit`` deep (iteratively: the check
    itself never recurses)."""
    if type(value) is not dict and type(value) is not list:
        return False
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        children = item.values() if type(item) is dict else item
        for child in children:
            if type(child) is dict or type(child) is list:
                pending.append((child, depth + 1))
    return False


@dataclass(frozen=True, slots=True)
class Job:
    """One execution request. ``deadline`` is the caller's absolute give-up time (Unix seconds)."""

    id: str
    ep: str
    shop_id: str
    input: bytes  # JSON text, serialised once by the caller
    deadline: float
    enqueued_at: float
    # At an EP with an input schema: the input queries the client projected ``input`` for, as
    # the sha256 (hex) of each query's text, by app (``#candidate`` for a rollout's candidate),
    # and "" for an app it knew to have no query (then ``input`` is the whole input). None: the
    # client projected nothing (an EP without a schema, or a client from before input queries).
    # The worker compares these with the bindings it reads (``ExecutionReport.input_query_client``).
    queries: dict[str, str] | None = None
    # The buyer's session token (``client.run(..., session=)``): the SESSION scope of script
    # data is keyed by it (within the job's shop). None: the call has no session.
    session: str | None = None
    # The caller's trace context (``scriptpool.config.tracing``), as its propagators wrote it:
    # W3C ``traceparent`` and ``tracestate``. None: the caller traces nothing (the usual case).
    trace: dict[str, str] | None = None

    def to_wire(self) -> dict[str, Any]:
        # Not dataclasses.asdict: that deep-copies, and this runs once per call.
        wire = {
            "id": self.id,
            "ep": self.ep,
            "shop_id": self.shop_id,
            "input": self.input,
            "deadline": self.deadline,
            "enqueued_at": self.enqueued_at,
        }
        if self.queries is not None:  # absent, not null: a job without queries is as it was
            wire["queries"] = self.queries
        if self.session is not None:  # absent, not null: a job without a session is as it was
            wire["session"] = self.session
        if self.trace is not None:  # absent, not null: a job without a trace context is as it was
            wire["trace"] = self.trace
        return wire

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
        if not (math.isfinite(job.enqueued_at) and job.enqueued_at >= 0):
            raise ValueError("a job's enqueued_at is a time (finite, not before 1970)")
        session = job.session
        if session is not None and not (type(session) is str and valid_session(session)):
            raise ValueError(f"a job's session is a string of 1 to {MAX_SESSION_CHARS} printable characters")
        if job.trace is not None and not _valid_trace(job.trace):
            raise ValueError(
                f"a job's trace context maps at most {_MAX_TRACE_ENTRIES} names to strings of at "
                f"most {_MAX_TRACE_VALUE} characters"
            )
        queries = job.queries
        if queries is not None and not (
            type(queries) is dict
            and len(queries) <= _MAX_JOB_QUERIES
            and all(
                type(app) is str
                and len(app) <= _MAX_JOB_QUERY_KEY
                and type(digest) is str
                and len(digest) <= _DIGEST_CHARS
                for app, digest in queries.items()
            )
        ):
            raise ValueError(
                f"a job's queries map at most {_MAX_JOB_QUERIES} app names to query digests "
                f"(strings of at most {_DIGEST_CHARS} characters)"
            )
        return job


# A job's trace context: what a propagator writes (traceparent, tracestate, perhaps baggage).
_MAX_TRACE_ENTRIES = 8
_MAX_TRACE_VALUE = 8192


def _valid_trace(carrier: object) -> bool:
    """A map of a few short names to strings (what is in them is the propagator's to judge)."""
    return (
        type(carrier) is dict
        and len(carrier) <= _MAX_TRACE_ENTRIES
        and all(
            type(name) is str
            and 0 < len(name) <= 64
            and type(value) is str
            and len(value) <= _MAX_TRACE_VALUE
            for name, value in carrier.items()
        )
    )


#: The longest session token a call may carry.
MAX_SESSION_CHARS = 256


def valid_session(token: str) -> bool:
    """Whether ``token`` (a str) is a session token: 1 to :data:`MAX_SESSION_CHARS` printable
    characters (it becomes part of a Redis key and of log lines)."""
    return 0 < len(token) <= MAX_SESSION_CHARS and token.isprintable()


# A job's ``queries``: one per app an EP can bind (25), the reducer and a candidate, with room to
# spare; an app name is short; a digest is a sha256 in hex (or "" for no query).
_MAX_JOB_QUERIES = 64
_MAX_JOB_QUERY_KEY = 128
_DIGEST_CHARS = 64


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
        """The error ``data`` holds; ``ValueError`` naming what is wrong if it is not one: the
        ``code`` a short string, the ``message`` a string, ``detail`` a map of names (never
        ``message``: the error is rebuilt as ``cls(message, **detail)``)."""
        if type(data) is not dict:
            raise ValueError(f"an error is a map, got {type(data).__name__}")
        code, message, detail = data.get("code"), data.get("message"), data.get("detail")
        if type(code) is not str or not 0 < len(code) <= _MAX_CODE:
            raise ValueError(f"an error's code is a string of 1 to {_MAX_CODE} characters")
        if type(message) is not str:
            raise ValueError("an error's message is a string")
        if not detail:
            detail = {}
        elif type(detail) is not dict or "message" in detail or any(type(k) is not str for k in detail):
            raise ValueError("an error's detail is a map of names other than 'message'")
        return cls(code, message, detail)


# Ours are under 30 characters; a longer "code" is not one (and error_class_for caches each).
_MAX_CODE = 64


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
    # At an EP with an input schema, for a script deployed with an input query: the sha256 (hex)
    # of the query its input was projected with (always the binding's), and what the client had
    # sent for: "current" (the same query), "stale" (another one, or none: the client had not
    # yet heard of a deploy) or "none" (a job without queries). Empty otherwise.
    input_query: str = ""
    input_query_client: str = ""
    # Writes the script's output listed (``storeWrites``) that the worker applies after the
    # reply: a successful run's, counted (the writes themselves never travel to the host).
    store_writes: int = 0
    # The app whose script made the report (a part's, or a single script's); empty for a
    # combined report (its parts carry theirs) and when no app was found (nothing bound).
    app: str = ""

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
            "input_query": self.input_query,
            "input_query_client": self.input_query_client,
            "store_writes": self.store_writes,
            "app": self.app,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ExecutionReport:
        """The report ``data`` holds; ``ValueError`` if a field has the wrong type (an integer
        passes for a float). A field this version does not know (a newer worker's) is left out,
        not an error."""
        if type(data) is not dict:
            raise ValueError(f"a report is a map, got {type(data).__name__}")
        if {name: type(value) for name, value in data.items()} == _REPORT_FIELDS:
            return cls(**data)  # what a worker of this version sends: every field, each its type
        fields = {}
        for name, value in data.items():
            kind = _REPORT_FIELDS.get(name)
            if kind is None:
                continue
            if type(value) is not kind:
                if kind is not float or type(value) is not int:
                    raise ValueError(f"report field {name} is {type(value).__name__}, not {kind.__name__}")
                value = float(value)
            fields[name] = value
        return cls(**fields)


# Each field's type, read off its default: every field has one.
_REPORT_FIELDS: dict[Any, type] = {
    name: type(spec.default) for name, spec in ExecutionReport.__dataclass_fields__.items()
}


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
        """The part ``data`` holds; ``ValueError`` naming what is wrong if it is not one."""
        if type(data) is not dict:
            raise ValueError(f"a part is a map, got {type(data).__name__}")
        app, version, status = data.get("app"), data.get("version"), data.get("status")
        if type(app) is not str or type(version) is not int:
            raise ValueError("a part's app is a string and its version an integer")
        if type(status) is not str or status not in _PART_STATUSES:
            raise ValueError(f"a part's status is one of {', '.join(sorted(_PART_STATUSES))}")
        error, report = data.get("error"), data.get("report")
        return cls(
            app=app,
            version=version,
            status=status,
            error=ErrorInfo.from_wire(error) if error else None,
            report=ExecutionReport() if report is None else ExecutionReport.from_wire(report),
        )


_PART_STATUSES = frozenset((PART_OK, PART_ERROR, PART_SKIPPED))


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
        """The execution ``data`` holds; ``ValueError`` naming what is wrong if it is not one.
        ``output`` is whatever the wire carried: the worker sends the script's JSON value."""
        if type(data) is not dict:
            raise ValueError(f"an execution is a map, got {type(data).__name__}")
        ok, error, report, parts = data.get("ok"), data.get("error"), data.get("report"), data.get("parts")
        if type(ok) is not bool:
            raise ValueError("an execution's ok is true or false")
        if nested_deeper_than(data.get("output"), MAX_OUTPUT_DEPTH):
            raise ValueError(f"an execution's output nests deeper than {MAX_OUTPUT_DEPTH}")
        if parts and type(parts) is not list and type(parts) is not tuple:
            raise ValueError(f"an execution's parts are a list, got {type(parts).__name__}")
        return cls(
            ok=ok,
            output=data.get("output"),
            error=ErrorInfo.from_wire(error) if error else None,
            report=ExecutionReport() if report is None else ExecutionReport.from_wire(report),
            parts=tuple(Part.from_wire(part) for part in parts) if parts else (),
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
        """The reply ``data`` holds; ``ValueError`` naming what is wrong if it is not one (our
        workers never send such a reply, but anyone who can write to Redis can)."""
        if type(data) is not dict:
            raise ValueError(f"a reply is a map, got {type(data).__name__}")
        job_id, shard, worker = data.get("job_id"), data.get("shard"), data.get("worker")
        received: Any = data.get("received_at")
        finished: Any = data.get("finished_at")
        if type(job_id) is not str or type(shard) is not int or type(worker) is not str:
            raise ValueError("a reply's job_id and worker are strings and its shard an integer")
        if not (
            (type(received) is float or type(received) is int)
            and (type(finished) is float or type(finished) is int)
            and math.isfinite(received)
            and math.isfinite(finished)
        ):
            raise ValueError("a reply's received_at and finished_at are finite numbers")
        execution, error = data.get("execution"), data.get("error")
        return cls(
            job_id=job_id,
            execution=Execution.from_wire(execution) if execution is not None else None,
            error=ErrorInfo.from_wire(error) if error is not None else None,
            shard=shard,
            worker=worker,
            received_at=float(received),
            finished_at=float(finished),
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
        """Whether a decoded reply-list item is a :class:`Taken` rather than a :class:`Reply`:
        ``taken`` is exactly true (a reply never has it; anything else there is not a notice)."""
        return data.get("taken") is True
