"""Hostile items on a client's reply list: none stops the reader, none costs another caller its
reply, and one that names a waiting caller gives that caller ``invalid_reply`` at once."""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import redis

from scriptpool.config import Settings
from scriptpool.config.errors import InvalidReply, ScriptpoolError
from scriptpool.config.wire import ErrorInfo, Execution, ExecutionReport, Job, Part, Reply
from scriptpool.producer import BreakerPolicy, Client, Outcome
from scriptpool.producer._breaker import CircuitBreaker
from scriptpool.producer._calls import Call
from scriptpool.producer._replies import ReplyDispatcher, Waiter
from scriptpool.registry import Registry
from tests.logs import captured_events

DEADLINE_S = 10.0  # what a caller would wait if the bad reply were left to time out


def good_reply(job_id: str, output: Any = None) -> dict[str, Any]:
    """What a worker sends for a script that succeeded, with a report and a part."""
    report = ExecutionReport(instructions=7, logs="l", lookup_ms=0.1, sha256="s", version=1, codec="json")
    part = Part("app", 1, "ok", None, report)
    execution = Execution(True, {"ok": job_id} if output is None else output, None, report, (part,))
    now = time.time()
    return Reply(job_id, execution, None, 0, "w@h:1", now, now).to_wire()


def packed(item: Any) -> bytes:
    return bytes(msgpack.packb(item, use_bin_type=True))


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


# Items from which no job id can be read: each is skipped, and counted as malformed.
UNREADABLE: dict[str, bytes] = {
    "not msgpack": b"\xc1 junk",
    "empty": b"",
    "truncated map": packed({"job_id": "j", "x": 1})[:-1],
    "trailing bytes": packed({"job_id": "j"}) + b"\x00",
    "a list": packed(["job_id", "j"]),
    "a string": packed("job_id"),
    "job_id a list": packed({"job_id": ["j"]}),
    "job_id a map": packed({"job_id": {"j": 1}}),
    "job_id an int": packed({"job_id": 7}),
    "job_id bytes": packed({"job_id": b"j"}),
    "job_id null": packed({"job_id": None}),
    "no job_id": packed({"execution": None}),
    "an int map key": b"\x81\x01\xa1j",
    "invalid utf-8": b"\x81\xa6job_id\xa2\xff\xfe",
    "extension type": packed({"job_id": msgpack.ExtType(5, b"x")}),
    "nested past the depth limit": _nested(5000),
    "a huge claimed array": b"\xdd\xff\xff\xff\xff",
    "1 MiB of noise": random.Random(20).randbytes(1 << 20),
}


def _with(path: tuple[str | int, ...], value: Any) -> Callable[[str], dict[str, Any]]:
    """A good reply with the field at ``path`` set to ``value`` (or removed, for ``_GONE``)."""

    def build(job_id: str) -> dict[str, Any]:
        reply = good_reply(job_id)
        node: Any = reply
        for key in path[:-1]:
            node = node[key]
        if value is _GONE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return reply

    return build


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


_GONE = object()
_ERROR = {"code": "runtime_error", "message": "m", "detail": {}}

# Bodies that name the waiting caller's job but are not a reply: that caller gets invalid_reply.
MALFORMED: dict[str, Callable[[str], dict[str, Any]]] = {
    "only a job id": lambda job_id: {"job_id": job_id},
    "taken not exactly true": lambda job_id: {"job_id": job_id, "taken": "yes"},
    "execution a string": _with(("execution",), "ok"),
    "execution a list": _with(("execution",), [True, 1]),
    "ok a string": _with(("execution", "ok"), "true"),
    "ok missing": _with(("execution", "ok"), _GONE),
    "report a list": _with(("execution", "report"), [1, 2]),
    "report a string": _with(("execution", "report"), "fast"),
    "report instructions a string": _with(("execution", "report", "instructions"), "many"),
    "report instructions a bool": _with(("execution", "report", "instructions"), True),
    "report logs a map": _with(("execution", "report", "logs"), {"x": 1}),
    "report run_ms a string": _with(("execution", "report", "run_ms"), "1.5"),
    "received_at a string": _with(("received_at",), "now"),
    "finished_at a string": _with(("finished_at",), "later"),
    "received_at NaN": _with(("received_at",), math.nan),
    "finished_at infinite": _with(("finished_at",), math.inf),
    "received_at missing": _with(("received_at",), _GONE),
    "shard a string": _with(("shard",), "0"),
    "shard a bool": _with(("shard",), False),
    "worker missing": _with(("worker",), _GONE),
    "worker a list": _with(("worker",), ["w"]),
    "error a string": _with(("error",), "boom"),
    "error code a list": _with(("error",), {**_ERROR, "code": ["timeout"]}),
    "error code an int": _with(("error",), {**_ERROR, "code": 504}),
    "error code huge": _with(("error",), {**_ERROR, "code": "x" * 100_000}),
    "error code empty": _with(("error",), {**_ERROR, "code": ""}),
    "error message missing": _with(("error",), {"code": "runtime_error"}),
    "error detail a list": _with(("error",), {**_ERROR, "detail": [1]}),
    "error detail names message": _with(("error",), {**_ERROR, "detail": {"message": "x"}}),
    "error detail a bytes key": _with(("error",), {**_ERROR, "detail": {b"k": 1}}),
    "execution error code a map": _with(("execution", "error"), {**_ERROR, "code": {"a": 1}}),
    "parts a map": _with(("execution", "parts"), {"app": "a"}),
    "part a string": _with(("execution", "parts"), ["part"]),
    "part status unknown": _with(("execution", "parts", 0, "status"), "maybe"),
    "part version a string": _with(("execution", "parts", 0, "version"), "1"),
    "part report an int": _with(("execution", "parts", 0, "report"), 3),
    # Workers refuse output nested past 128 levels; a forged reply must not bring it to the host.
    "output nested 129 deep": _with(("execution", "output"), _nested(129)),
    "output nested 1,000 deep": _with(("execution", "output"), _nested(1_000)),
}


@pytest.fixture
def client(registry: Registry, settings: Settings, redis_client: redis.Redis) -> Iterator[Client]:
    """A client on the test Redis; no worker: each test plays the worker's part itself."""
    with Client(settings.replace(shards=1)) as client:
        yield client


def _reply_key(client: Client) -> str:
    return client._groups[0].replies.reply_key


def _take_job(redis_client: redis.Redis, settings: Settings) -> str:
    """The id of the first job of the next message on shard 0's queue, as a worker would see it."""
    item = redis_client.brpop([settings.keys.queue(0)], timeout=5)
    assert item is not None, "the call was never published"
    return str(json.loads(item[1])["headers"]["id"])


def _answered(
    client: Client, redis_client: redis.Redis, settings: Settings, body: Callable[[str], Any], **run: Any
) -> Outcome:
    """Run one call, answer its job with ``body(job_id)`` (bytes pass as they are) and return
    the caller's outcome, or raise what the call raised."""
    results: list[Outcome | BaseException] = []

    def caller() -> None:
        try:
            results.append(client.run("test", "1", {}, timeout=DEADLINE_S, fallback="fb", **run))
        except BaseException as exc:
            results.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    job_id = _take_job(redis_client, settings)
    item = body(job_id)
    redis_client.rpush(_reply_key(client), item if isinstance(item, bytes) else packed(item))
    thread.join(DEADLINE_S + 5)
    assert results, "the caller never returned"
    if isinstance(results[0], BaseException):
        raise results[0]
    return results[0]


@pytest.mark.parametrize("multi_pop", [True, False], ids=["blmpop", "blpop-lpop"])
def test_a_bad_item_costs_only_itself_and_the_rest_of_its_read_is_delivered(
    redis_client: redis.Redis, settings: Settings, multi_pop: bool
) -> None:
    """Issue 20, item 6: an item whose job_id is a list used to raise TypeError into the
    reconnect loop, and the good reply read with it was lost. Now it is logged and skipped,
    and every other item of the same read reaches its waiter (both ways of reading)."""

    class Dispatcher(ReplyDispatcher):
        pass

    Dispatcher.multi_pop = multi_pop
    key = settings.keys.replies("hostile-batch")
    dispatcher = Dispatcher(settings.redis_url, key)
    try:
        waiters = {f"j{i}": dispatcher.expect(f"j{i}") for i in range(3)}
        items = [packed(good_reply("j0")), *UNREADABLE.values(), packed(good_reply("j1"))]
        items += [packed({"job_id": ["j"]}), packed(good_reply("j2"))]
        with captured_events() as events:
            redis_client.rpush(key, *items)  # one push: read together by one BLMPOP
            replies = {job: waiter.wait(5) for job, waiter in waiters.items()}
        assert {job: r and r["job_id"] for job, r in replies.items()} == {j: j for j in waiters}
        assert dispatcher.malformed == len(UNREADABLE) + 1
        assert sum(e["event"] == "reply_malformed" for e in events) == len(UNREADABLE) + 1
        assert not [e for e in events if e["event"] in ("reply_dispatcher_failed", "reply_delivery_failed")]
    finally:
        dispatcher.close()


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_reply_gives_its_caller_invalid_reply_at_once(
    client: Client, redis_client: redis.Redis, settings: Settings, kind: str
) -> None:
    """A body that names the caller's job but is not a reply: that caller gets the named error
    ``invalid_reply`` (status ``error``, its fallback as output) now, not a timeout at its
    deadline, nor an exception out of ``run``; the same client then serves the next call."""
    outcome = _answered(client, redis_client, settings, MALFORMED[kind])
    assert (outcome.status, outcome.error_code, outcome.output) == ("error", "invalid_reply", "fb"), outcome
    assert outcome.error is not None and "cannot be read" in outcome.error.message
    good = _answered(client, redis_client, settings, good_reply)
    assert good.ok and good.output == {"ok": good.job_id}


def test_strict_and_asyncio_callers_get_the_named_error_too(
    client: Client, redis_client: redis.Redis, settings: Settings
) -> None:
    """``strict=True`` raises InvalidReply (a ScriptpoolError with its code), never TypeError;
    an asyncio caller gets the same outcome."""
    with pytest.raises(InvalidReply) as raised:
        _answered(client, redis_client, settings, MALFORMED["error code a list"], strict=True)
    assert raised.value.code == "invalid_reply"

    async def main() -> Outcome:
        task = asyncio.ensure_future(client.run_async("test", "1", {}, timeout=DEADLINE_S))
        job_id = await asyncio.to_thread(_take_job, redis_client, settings)
        redis_client.rpush(_reply_key(client), packed(MALFORMED["received_at a string"](job_id)))
        return await task

    outcome = asyncio.run(main())
    assert (outcome.status, outcome.error_code) == ("error", "invalid_reply")


def test_a_strict_caller_gets_the_named_error_whatever_detail_a_worker_sent(
    client: Client, redis_client: redis.Redis, settings: Settings
) -> None:
    """A well-formed error reply raises its own named error with its detail under strict=True."""
    body = _with(("execution",), {"ok": False, "error": {**_ERROR, "detail": {"exit_code": 3}}})
    with pytest.raises(ScriptpoolError) as raised:
        _answered(client, redis_client, settings, body, strict=True)
    assert (raised.value.code, raised.value.detail) == ("runtime_error", {"exit_code": 3})


_HOSTILE_VALUES: list[Any] = [
    None, "", "x", "runtime_error", 0, -1, 2**63 - 1, 1.5, math.nan, math.inf, True, False,
    [], [1, "a"], {}, {"a": 1}, {"code": "c", "message": "m"}, b"\x00\xff", [[[]]], {"message": 1},
]  # fmt: skip


def _mutate(node: Any, rng: random.Random) -> Any:
    """``node`` with one field somewhere inside replaced, removed or added."""
    if isinstance(node, dict) and node and rng.random() < 0.7:
        key = rng.choice(list(node))
        roll = rng.random()
        if roll < 0.15:
            return {k: v for k, v in node.items() if k != key}
        if roll < 0.5:
            return {**node, key: _mutate(node[key], rng)}
        return {**node, key: rng.choice(_HOSTILE_VALUES)}
    if isinstance(node, list) and node and rng.random() < 0.7:
        index = rng.randrange(len(node))
        return [*node[:index], _mutate(node[index], rng), *node[index + 1 :]]
    return rng.choice(_HOSTILE_VALUES)


def test_fuzzed_replies_decode_or_fail_by_value_error_and_never_raise_out_of_a_call(
    client: Client,
) -> None:
    """5,000 seeded mutations of a good reply, through the client's own decoding: each becomes
    an outcome (ok, error, or invalid_reply), and only named errors ever raise under strict."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    kinds: dict[str | None, int] = {}
    for _ in range(5_000):
        wire = msgpack.unpackb(packed(_mutate(good_reply("j"), rng)), raw=False)
        try:
            Reply.from_wire(wire)
        except ValueError:
            pass
        except Exception as exc:  # pragma: no cover - the failure being looked for
            raise AssertionError(f"seed {seed}: {type(exc).__name__} decoding {wire!r}") from exc
        now = time.time()
        job = Job("j", "test", "1", b"{}", deadline=now + 5, enqueued_at=now)
        call = Call(job, 0, CircuitBreaker(BreakerPolicy()), "fb", time.perf_counter())
        call.waiter = Waiter()
        try:
            outcome = client._conclude(call, wire)
            outcome.raise_for_status()
        except ScriptpoolError:
            pass
        except Exception as exc:  # pragma: no cover
            raise AssertionError(f"seed {seed}: {type(exc).__name__} concluding {wire!r}") from exc
        else:
            assert outcome.ok
        kinds[outcome.error_code] = kinds.get(outcome.error_code, 0) + 1
    assert kinds.get("invalid_reply", 0) > 1000, (seed, kinds)  # the mutations did hit


def test_wire_types_refuse_what_a_worker_never_sends() -> None:
    """Each wire type names what is wrong by ValueError, and still reads what workers send
    (an integer where a float goes, a newer worker's unknown report field, no report)."""
    assert ExecutionReport.from_wire({"run_ms": 2, "future_field": [1]}) == ExecutionReport(run_ms=2.0)
    assert Execution.from_wire({"ok": True, "output": [1]}).report == ExecutionReport()
    assert ErrorInfo.from_wire({"code": "c", "message": "m", "detail": None}) == ErrorInfo("c", "m")
    refusals: list[tuple[Callable[[], object], str]] = [
        (lambda: ExecutionReport.from_wire([]), "a report is a map"),  # type: ignore[arg-type]
        (lambda: ExecutionReport.from_wire({"version": "2"}), "report field version is str"),
        (lambda: ErrorInfo.from_wire({"code": 1, "message": "m"}), "code is a string"),
        (lambda: Part.from_wire({"app": "a", "version": 1, "status": "odd"}), "status is one of"),
        (lambda: Execution.from_wire({"ok": 1}), "ok is true or false"),
        (lambda: Reply.from_wire(["j"]), "a reply is a map"),  # type: ignore[arg-type]
    ]
    for bad, words in refusals:
        with pytest.raises(ValueError, match=words):
            bad()


def test_a_reply_key_of_another_kind_is_replaced_and_the_client_serves_again(
    client: Client, redis_client: redis.Redis, settings: Settings
) -> None:
    """Something sets the client's reply list to a string: no reply can be read from it or
    pushed onto it. The reader logs reply_list_replaced and deletes it (it is the client's own
    key, and holds no reply), and the next call is answered as usual."""
    key = _reply_key(client)
    with captured_events() as events:
        redis_client.set(key, b"not a list")
        deadline = time.monotonic() + 5
        while redis_client.type(key) == b"string" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert redis_client.type(key) != b"string"
    assert "reply_list_replaced" in [e["event"] for e in events]
    good = _answered(client, redis_client, settings, good_reply)
    assert good.ok and good.output == {"ok": good.job_id}
