"""The worker against what a hostile queue and a failing Redis do to it, through real Redis and
real workers: any message kombu pops leaves the worker serving, a Redis paused during a pull
loses no job, a warm shutdown stops the pulls, and a shop new to a worker is not refused for the
cost of the shop flooding it."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import redis

from scriptpool import Registry, Settings
from scriptpool.config import Keys
from scriptpool.config.wire import CONTENT_TYPE, Job
from scriptpool.workers._fair import FairQueue
from tests import guests
from tests.conftest import TEST_ARTIFACT_KEY, deployer_fixture
from tests.pool import WorkerProcess, shops_on

SHARDS = 2
SHOP, OTHER = shops_on(0, SHARDS, 2, prefix="review25b")


@pytest.fixture(scope="module")
def pool_settings(redis_url: str) -> Settings:
    """Two shards on the test Redis."""
    return Settings(redis_url=redis_url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS)


_WORKER: list[WorkerProcess] = []


@pytest.fixture
def worker(pool_settings: Settings) -> WorkerProcess:
    """The one worker of shard 0, started again if an earlier test killed it."""
    if not _WORKER or not _WORKER[0].alive:
        _WORKER[:] = [WorkerProcess(pool_settings, [0], "rv0").wait_ready()]
    return _WORKER[0]


@pytest.fixture(scope="module", autouse=True)
def _stop_worker() -> Iterator[None]:
    """The module's worker is stopped after it."""
    yield
    for started in _WORKER:
        started.stop()


deployer = deployer_fixture(after=("worker",), scope="function")


def _envelope(keys: Keys, shard: int, body: bytes, reply_to: str) -> str:
    """A kombu Redis-transport task message carrying ``body`` (msgpack) for ``shard``."""
    task_id = uuid.uuid4().hex
    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "binary",
        "content-type": CONTENT_TYPE,
        "headers": {"lang": "py", "task": Keys.TASK, "id": task_id, "root_id": task_id, "retries": 0},
        "properties": {
            "correlation_id": task_id,
            "reply_to": reply_to,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": keys.queue(shard)},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid.uuid4().hex,
        },
    })  # fmt: skip


def _job_message(
    keys: Keys, shard: int, shop: str, reply_to: str, *, deadline_s: float = 20.0, ep: str = "test"
) -> tuple[str, str]:
    """(job id, envelope) of one well-formed job."""
    now = time.time()
    job = Job(uuid.uuid4().hex, ep, shop, b'{"n":1}', deadline=now + deadline_s, enqueued_at=now)
    body = msgpack.packb([[job.to_wire()], {}, {}], use_bin_type=True)
    return job.id, _envelope(keys, shard, body, reply_to)


def _replies(client: redis.Redis, reply_to: str, count: int, timeout_s: float) -> dict[str, dict[str, Any]]:
    """Up to ``count`` replies pushed onto ``reply_to`` within ``timeout_s``, by job id."""
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < count and time.monotonic() < deadline:
        raw = client.lpop(reply_to)
        if raw is None:
            time.sleep(0.01)
            continue
        reply = msgpack.unpackb(raw, raw=False)
        if "job_id" in reply:
            found[reply["job_id"]] = reply
    return found


def _served(client: redis.Redis, keys: Keys, shop: str = SHOP, timeout_s: float = 10) -> bool:
    """Whether one job of ``shop`` on shard 0 is answered within ``timeout_s``."""
    reply_to = keys.replies(uuid.uuid4().hex)
    job_id, message = _job_message(keys, 0, shop, reply_to)
    client.lpush(keys.queue(0), message)
    return job_id in _replies(client, reply_to, 1, timeout_s)


# -- 1. kombu's transport guard, with the worker idle (Celery's own BRPOP takes the message) ----

HOSTILE_WHILE_IDLE: dict[str, str | bytes] = {
    "deep": "[" * 100_000,
    "not_utf8": b"\xff",
    "empty_object": "{}",
    "empty_array": "[]",
    "null": "null",
    "string": '"x"',
    "properties_not_a_dict": '{"properties": 1}',
    "no_delivery_tag": '{"properties": {}}',
}


@pytest.mark.parametrize("name", list(HOSTILE_WHILE_IDLE))
def test_a_hostile_message_taken_by_celery_leaves_the_worker_serving(
    name: str, worker: WorkerProcess, deployer: Registry, redis_client: redis.Redis, pool_settings: Settings
) -> None:
    """A message pushed onto the shard queue while the worker idles: kombu's BRPOP takes it.
    The worker stays up and answers the next legit job (``scriptpool.workers._transport``)."""
    keys = pool_settings.keys
    deployer.deploy("test", SHOP, guests.ECHO)
    assert _served(redis_client, keys)
    redis_client.lpush(keys.queue(0), HOSTILE_WHILE_IDLE[name])
    time.sleep(3)  # Celery's "Unrecoverable error" takes about 2 s to end the process
    assert worker.alive, worker.log()[-3000:]
    assert _served(redis_client, keys), worker.log()[-3000:]


# -- 2. the pull loop's RPOP when Redis stalls longer than the reply connection's timeout -------


def test_a_redis_stall_during_a_pull_loses_no_queued_job(
    worker: WorkerProcess, deployer: Registry, redis_client: redis.Redis, pool_settings: Settings
) -> None:
    """With the worker paused, one delivery and 24 more messages queue; Redis then stalls for
    6 s (SIGSTOP: a fork, a swap storm, a VM pause) just as the worker resumes. The worker's
    pull sends ``RPOP queue 8`` and gives up reading after its 2 s socket timeout, but Redis runs
    the RPOP when it wakes (``ReplySession.pop`` waits for that answer, up to a minute): every
    job is answered or still queued, none lost."""
    keys = pool_settings.keys
    deployer.deploy("test", SHOP, guests.ECHO)
    assert _served(redis_client, keys)
    redis_pid = int(redis_client.info("server")["process_id"])
    reply_to = keys.replies(uuid.uuid4().hex)
    jobs = set()
    os.killpg(worker.process.pid, signal.SIGSTOP)
    try:
        for _ in range(25):
            job_id, message = _job_message(keys, 0, SHOP, reply_to, deadline_s=60)
            redis_client.lpush(keys.queue(0), message)
            jobs.add(job_id)
        time.sleep(0.3)  # Redis has answered the worker's BRPOP into its socket
        os.kill(redis_pid, signal.SIGSTOP)
    finally:
        os.killpg(worker.process.pid, signal.SIGCONT)
    try:
        time.sleep(6)
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    replies = _replies(redis_client, reply_to, len(jobs), 20)
    queued = redis_client.llen(keys.queue(0))
    lost = len(jobs) - len(replies) - queued
    assert lost == 0, f"{lost} of {len(jobs)} jobs neither answered nor queued; {worker.log()[-1500:]}"


# -- 3. the warm-shutdown check ----------------------------------------------------------------


def test_a_warm_shutdown_stops_the_pulls(
    worker: WorkerProcess, deployer: Registry, redis_client: redis.Redis, pool_settings: Settings
) -> None:
    """SIGTERM (Celery's warm shutdown) arrives while the worker runs a slow job; five messages
    wait behind it. The loop must run what it holds and pull no more (``_serve``'s docstring):
    the five stay queued for the next worker (Celery sets ``state.should_stop`` to the exit code,
    0 for a warm shutdown: "set" is tested by identity)."""
    keys = pool_settings.keys
    deployer.define_extension_point("slow", limits={"fuel": 9_000_000_000, "wall_ms": 10_000})
    deployer.deploy("slow", SHOP, guests.echo(burn=1_200_000_000))
    deployer.deploy("test", SHOP, guests.ECHO)
    assert _served(redis_client, keys)
    reply_to = keys.replies(uuid.uuid4().hex)
    slow_id, message = _job_message(keys, 0, SHOP, reply_to, ep="slow", deadline_s=60)
    redis_client.lpush(keys.queue(0), message)
    time.sleep(0.3)  # taken, and compiling or running (about 1.5 s of guest work here)
    for _ in range(5):
        redis_client.lpush(keys.queue(0), _job_message(keys, 0, SHOP, reply_to, deadline_s=60)[1])
    worker.process.send_signal(signal.SIGTERM)
    worker.process.wait(timeout=30)
    replies = _replies(redis_client, reply_to, 6, 2)
    assert slow_id in replies, worker.log()[-2000:]
    assert redis_client.llen(keys.queue(0)) == 5, f"{len(replies) - 1} of 5 pulled during a warm shutdown"


# -- 4. fairness: a shop new to the worker inherits the flooder's cost ------------------------


def test_a_quiet_shop_new_to_the_worker_is_not_refused_for_the_flooders_cost() -> None:
    """A flooding shop runs 150 ms jobs (a script near its instruction limit) and two of them
    wait; a quiet shop that has never run here sends two 50 ms-deadline calls. It has used
    nothing, so it is under its share and is not refused ``quota_exceeded`` ("over its fair
    share"): a shop new here is not guessed to cost what the flooder's runs cost."""
    fair: FairQueue[str] = FairQueue()
    now = 1000.0
    for n in range(4):  # the flood so far: the mean cost becomes the flooder's
        fair.add(f"flood{n}", "flooder", now + 60)
        taken, _ = fair.take(now)
        assert taken is not None
        fair.charge("flooder", 0.150)
    fair.add("flood-a", "flooder", now + 60)
    fair.add("flood-b", "flooder", now + 60)
    fair.add("quiet-1", "quiet", now + 0.050)
    fair.add("quiet-2", "quiet", now + 0.050)
    _, refused = fair.take(now)
    assert [item for item, _ in refused if item.startswith("quiet")] == []
