"""The direct publisher writes exactly what Celery's ``send_task`` writes, and real workers run it.

If a Celery or kombu upgrade changes the message format, the field-by-field comparison fails
here before any caller notices.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import msgpack
import pytest
import redis

from scriptpool.config import Keys, Settings
from scriptpool.config.wire import Job
from scriptpool.engine import Sandbox
from scriptpool.producer._publisher import TaskPublisher
from scriptpool.registry import Registry
from scriptpool.workers import create_app
from tests import guests
from tests.pool import WorkerProcess, pool_fixtures, shop_on

SHARDS = 2


def _job(job_id: str, shop: str, payload: bytes = b'{"a":1}', timeout: float = 5.0) -> dict[str, Any]:
    now = time.time()
    return Job(job_id, "test", shop, payload, deadline=now + timeout, enqueued_at=now).to_wire()


def _only_message(client: redis.Redis, queue: str) -> tuple[bytes, dict[str, Any]]:
    """The one message in Redis (asserting it is on the queue's own list), raw and decoded."""
    keys = [k.decode() for k in client.keys("*") if client.type(k) == b"list"]
    assert keys == [queue]  # priority 0: the bare queue name, no priority-suffixed list
    raw = client.lpop(queue)
    assert isinstance(raw, bytes)
    return raw, json.loads(raw)


def _compare(ours: Any, theirs: Any, path: str = "") -> None:
    """Recursive, so a failure names the first field that differs."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), path
        assert list(ours) == list(theirs), f"{path}: keys {list(ours)} != {list(theirs)}"
        for key in theirs:
            if f"{path}/{key}" == "/properties/delivery_tag":
                continue  # unique per message; checked by the caller
            _compare(ours[key], theirs[key], f"{path}/{key}")
    else:
        assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"


@pytest.mark.parametrize("kwargs", [{}, {"announce": True}])
def test_envelope_equals_send_task_field_by_field(
    redis_client: redis.Redis, settings: Settings, kwargs: dict[str, Any]
) -> None:
    """Same key, same JSON envelope, same headers and properties, same decoded body."""
    settings = settings.replace(shards=SHARDS)
    queue = settings.keys.queue(1)
    reply_to = settings.keys.replies("c0ffee")
    jobs = [_job("job-1", "shop-a"), _job("job-2", "shop-b", b'{"b":[1,2]}')]
    app = create_app(settings)
    try:
        app.send_task(
            Keys.TASK,
            args=jobs,
            kwargs=kwargs,
            queue=queue,
            task_id="job-1",
            reply_to=reply_to,
            retry=False,
        )
    finally:
        app.close()
    theirs_raw, theirs = _only_message(redis_client, queue)

    # In production argsrepr is a short label instead of saferepr(args) (cheaper, and inputs stay
    # out of logs); here it is Celery's own, so that every field must match.
    argsrepr = theirs["headers"]["argsrepr"]
    TaskPublisher(redis_client, Keys.TASK).publish(
        "job-1", jobs, kwargs, queue=queue, reply_to=reply_to, argsrepr=argsrepr
    )
    ours_raw, ours = _only_message(redis_client, queue)

    _compare(ours, theirs)
    for tag in (ours["properties"]["delivery_tag"], theirs["properties"]["delivery_tag"]):
        assert isinstance(tag, str) and len(tag) >= 32
    assert ours["properties"]["delivery_tag"] != theirs["properties"]["delivery_tag"]
    # The body as the worker decodes it: base64, then msgpack (never pickle).
    assert ours["properties"]["body_encoding"] == "base64"
    assert ours["content-type"] == "application/x-msgpack"
    decoded = msgpack.unpackb(base64.b64decode(ours["body"]), raw=False)
    assert decoded == msgpack.unpackb(base64.b64decode(theirs["body"]), raw=False)
    assert decoded[0] == jobs and decoded[1] == kwargs
    # Our template encodes exactly as json.dumps does (kombu's dumps writes the same separators).
    assert len(ours_raw) == len(theirs_raw) - len(theirs["properties"]["delivery_tag"]) + len(
        ours["properties"]["delivery_tag"]
    )


def test_template_matches_json_dumps_with_awkward_strings(redis_client: redis.Redis) -> None:
    """Quotes, backslashes and non-ASCII in the variable fields are escaped as json.dumps does."""
    publisher = TaskPublisher(redis_client, Keys.TASK, origin='gen1@h"ost\\x')
    args = [{"id": "x", "input": b"\x00\xff"}]
    fields = {"queue": 'q"\\ü', "reply_to": "r\n\t", "argsrepr": "[job é/ü \"'\\]"}
    encoded = publisher.encode('t"id', args, {"announce": True}, **fields)
    message = publisher.message('t"id', args, {"announce": True}, **fields)
    decoded = json.loads(encoded)
    message["properties"]["delivery_tag"] = decoded["properties"]["delivery_tag"]
    assert decoded == message
    assert encoded == json.dumps(message)


def test_trace_headers_join_the_celery_headers_and_change_nothing_else(redis_client: redis.Redis) -> None:
    """A traced call's ``traceparent`` and ``tracestate`` are top-level message headers, where
    Celery's OpenTelemetry instrumentation reads them (``getattr(request, "traceparent")``);
    the rest of the envelope is the template's, and our own headers are never replaced."""
    publisher = TaskPublisher(redis_client, Keys.TASK, origin="gen1@host")
    args = [{"id": "x", "input": b"{}"}]
    fields = {"queue": "q", "reply_to": "r", "argsrepr": "[job ep/1]"}
    traced = {
        "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01",
        "tracestate": "k=v",
        "id": "not ours",
    }
    plain, with_trace = (
        json.loads(publisher.encode("tid", args, {}, **fields, headers=headers)) for headers in (None, traced)
    )
    assert with_trace["headers"] == {
        **plain["headers"],
        **{k: traced[k] for k in ("traceparent", "tracestate")},
    }
    with_trace["properties"]["delivery_tag"] = plain["properties"]["delivery_tag"]
    assert {k: v for k, v in with_trace.items() if k != "headers"} == {
        k: v for k, v in plain.items() if k != "headers"
    }


# -- a real worker consumes what we publish ----------------------------------------------------


pool_settings, workers = pool_fixtures(SHARDS, {"pub0": [0]})


@pytest.fixture(scope="module")
def worker(workers: dict[str, WorkerProcess]) -> WorkerProcess:
    return workers["pub0"]


def _replies(client: redis.Redis, key: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        item = client.blpop([key], timeout=1)
        if item is not None:
            out.append(msgpack.unpackb(item[1], raw=False))
    return out


def test_a_real_worker_runs_a_directly_published_batch(
    pool_settings: Settings, worker: WorkerProcess, redis_client: redis.Redis, sandbox: Sandbox
) -> None:
    """One LPUSH carrying three jobs: the worker announces it took the message, replies to each
    live job in order, and drops the stale one unexecuted."""
    registry = Registry(redis_client, pool_settings, sandbox)
    registry.define_extension_point("test")
    shop = shop_on(0, SHARDS)
    registry.deploy("test", shop, guests.ECHO)
    reply_to = pool_settings.keys.replies("publisher-test")
    now = time.time()
    stale = Job("job-stale", "test", shop, b'{"late":1}', deadline=now - 1, enqueued_at=now - 2).to_wire()
    jobs = [_job("job-a", shop, b'{"n":1}'), stale, _job("job-b", shop, b'{"n":2}')]
    TaskPublisher(redis_client, Keys.TASK).publish(
        "job-a",
        jobs,
        {"announce": True},
        queue=pool_settings.keys.queue(0),
        reply_to=reply_to,
        argsrepr="[3 jobs]",
    )
    deadline = time.monotonic() + 10
    while redis_client.llen(reply_to) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert 0 < redis_client.ttl(reply_to) <= 60  # reply lists expire when nobody reads them
    replies = _replies(redis_client, reply_to, 3)
    assert [(r["job_id"], r.get("taken", False)) for r in replies] == [
        ("job-a", True),
        ("job-a", False),
        ("job-b", False),
    ]
    outputs = [r["execution"]["output"] for r in replies[1:]]
    assert outputs == [{"n": 1}, {"n": 2}]
    assert all(r["shard"] == 0 and r["worker"].startswith("pub0@") for r in replies[1:])
    deadline = time.monotonic() + 5
    while "job-stale" not in worker.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = worker.log()
    assert "stale_job_dropped" in log and "job-stale" in log
    executed = [line for line in log.splitlines() if '"event": "execution"' in line]
    assert not any("job-stale" in line for line in executed)


def test_a_foreign_reply_to_is_never_written(
    pool_settings: Settings, worker: WorkerProcess, redis_client: redis.Redis, sandbox: Sandbox
) -> None:
    """A message naming a key outside our reply lists runs, but nothing is written there."""
    registry = Registry(redis_client, pool_settings, sandbox)
    registry.define_extension_point("test")
    shop = shop_on(0, SHARDS, skip=1)
    registry.deploy("test", shop, guests.ECHO)
    TaskPublisher(redis_client, Keys.TASK).publish(
        "job-foreign",
        [_job("job-foreign", shop)],
        {},
        queue=pool_settings.keys.queue(0),
        reply_to="somebody:else",
        argsrepr="[job]",
    )
    deadline = time.monotonic() + 5
    while "job-foreign" not in worker.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "job-foreign" in worker.log()
    assert redis_client.exists("somebody:else") == 0


def test_wire_forms_carry_every_field() -> None:
    """Job and Reply write their dicts by hand (asdict deep-copies); a new field must not be
    forgotten there."""
    import dataclasses

    from scriptpool.config.wire import ErrorInfo, Execution, ExecutionReport, Reply, Taken

    job = Job("id", "ep", "shop", b"{}", deadline=2.0, enqueued_at=1.0)
    # A job without input queries, a session or a trace context carries none of those keys
    # (what a 0.1 worker reads).
    optional = ("queries", "session", "trace")
    assert job.to_wire() == {k: v for k, v in dataclasses.asdict(job).items() if k not in optional}
    assert Job.from_wire(job.to_wire()) == job
    traceparent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    full = dataclasses.replace(
        job,
        queries={"default": "ab" * 32, "other": ""},
        session="buyer-1",
        trace={"traceparent": traceparent},
    )
    assert full.to_wire() == dataclasses.asdict(full)
    assert Job.from_wire(full.to_wire()) == full
    execution = Execution(True, {"x": [1]}, None, ExecutionReport(instructions=7, logs="l", sha256="s"))
    failed = Reply("id", None, ErrorInfo("worker_error", "lost Redis", {"n": 1}), 1, "w@h:1", 1.0, 2.0)
    for reply in (Reply("id", execution, None, 1, "w@h:1", received_at=1.0, finished_at=2.0), failed):
        assert reply.to_wire() == dataclasses.asdict(reply)
        assert Reply.from_wire(reply.to_wire()) == reply
    assert Taken("id").to_wire() == {"job_id": "id", "taken": True}
