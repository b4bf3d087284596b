"""The worker's serving loop (``scriptpool.workers._serve``) against hostile queue messages and
beside another worker of its shard, through real workers and hand-built queue messages: one bad
message costs no other caller its reply, a worker leaves its peers work, and a shop with a quota
gets the answers a shop without one gets."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import pytest
import redis

from scriptpool import Registry, Settings
from scriptpool.config import Keys
from scriptpool.config.quotas import Quota, set_quota
from scriptpool.config.wire import CONTENT_TYPE, Job
from tests import guests
from tests.conftest import TEST_ARTIFACT_KEY, deployer_fixture
from tests.pool import WorkerProcess, shops_on, start_workers

SHARDS = 2
# Shard 0: one worker (r0). Shard 1: two workers (p1a, p1b), as a shard scaled out.
SOLO_SHOP, OTHER_SHOP = shops_on(0, SHARDS, 2, prefix="review")
SHORT_SHOP, LONG_SHOP, MEDIUM_SHOP = shops_on(1, SHARDS, 3, prefix="review")
# About 10M instructions (under the 11M default limit): tens of milliseconds.
LONG = guests.echo(burn=2_500_000)
# About 2M instructions: a few milliseconds.
MEDIUM = guests.echo(burn=500_000)


@pytest.fixture(scope="module")
def pool_settings(redis_url: str) -> Settings:
    """Two shards on the test Redis."""
    return Settings(redis_url=redis_url, artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS)


@pytest.fixture(scope="module")
def workers(pool_settings: Settings) -> Iterator[dict[str, WorkerProcess]]:
    """One worker of shard 0, two of shard 1."""
    started = start_workers(pool_settings, {"r0": [0], "p1a": [1], "p1b": [1]})
    STARTED.append(time.monotonic())
    yield {worker.name: worker for worker in started}
    for worker in started:
        worker.stop()


deployer = deployer_fixture(after=("workers",))
STARTED: list[float] = []  # when the module's workers were ready


# -- hand-built messages, as anyone who can write to Redis can push them --------------------------


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


def _job_message(keys: Keys, shard: int, shop: str, reply_to: str, *, ep: str = "test") -> tuple[str, str]:
    """(job id, envelope) of one well-formed job with a deadline 20 s away."""
    now = time.time()
    job = Job(uuid.uuid4().hex, ep, shop, b'{"n":1}', deadline=now + 20, enqueued_at=now)
    body = msgpack.packb([[job.to_wire()], {}, {}], use_bin_type=True)
    return job.id, _envelope(keys, shard, body, reply_to)


def _replies(client: redis.Redis, reply_to: str, count: int, timeout_s: float) -> dict[str, dict[str, Any]]:
    """Up to ``count`` replies pushed onto ``reply_to`` within ``timeout_s``, by job id."""
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < count and time.monotonic() < deadline:
        # Polled, not BLPOP: the test client's socket timeout is shorter than the wait.
        raw = client.lpop(reply_to)
        if raw is None:
            time.sleep(0.01)
            continue
        reply = msgpack.unpackb(raw, raw=False)
        if "job_id" in reply:
            found[reply["job_id"]] = reply
    return found


@contextmanager
def _paused(*stopped: WorkerProcess) -> Iterator[None]:
    """The workers stopped (SIGSTOP) while the block queues messages, resumed after."""
    for worker in stopped:
        os.killpg(worker.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for worker in stopped:
            os.killpg(worker.process.pid, signal.SIGCONT)


def _warm(client: redis.Redis, keys: Keys, shard: int, shop: str, calls: int) -> set[str]:
    """Run ``calls`` jobs of ``shop`` one after another (compiling its script on whichever workers
    take them); the workers that answered."""
    reply_to = keys.replies(uuid.uuid4().hex)
    seen = set()
    for _ in range(calls):
        job_id, message = _job_message(keys, shard, shop, reply_to)
        client.lpush(keys.queue(shard), message)
        reply = _replies(client, reply_to, 1, 30).get(job_id)
        assert reply is not None and reply["error"] is None, reply
        seen.add(reply["worker"])
    return seen


# -- one hostile message must not cost other callers their replies ------------------------------


def _hostile_among_legit(
    settings: Settings, client: redis.Redis, worker: WorkerProcess, hostile: str
) -> tuple[set[str], dict[str, dict[str, Any]]]:
    """With the worker paused: one legit job (the delivery), ``hostile``, then four legit jobs of
    the same caller; resumed, the legit jobs' ids and the replies that came within 5 s."""
    keys = settings.keys
    queue = keys.queue(0)
    reply_to = keys.replies(uuid.uuid4().hex)
    legit = set()
    with _paused(worker):
        job_id, message = _job_message(keys, 0, SOLO_SHOP, reply_to)
        client.lpush(queue, message)
        legit.add(job_id)
        client.lpush(queue, hostile)
        for _ in range(4):
            job_id, message = _job_message(keys, 0, SOLO_SHOP, reply_to)
            client.lpush(queue, message)
            legit.add(job_id)
    return legit, _replies(client, reply_to, len(legit), 5)


def test_a_deeply_nested_message_pulled_between_jobs_loses_no_other_callers_jobs(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, redis_client: redis.Redis
) -> None:
    """A message that is JSON nested 100,000 deep sits on the shard queue between legit
    messages: the worker refuses it (``json.loads`` raises RecursionError on it) and still
    answers every legit job, those taken by the same pull included."""
    deployer.deploy("test", SOLO_SHOP, guests.ECHO)
    worker = workers["r0"]
    _warm(redis_client, pool_settings.keys, 0, SOLO_SHOP, 1)
    legit, replies = _hostile_among_legit(pool_settings, redis_client, worker, "[" * 100_000)
    assert worker.alive
    unanswered = legit - set(replies)
    assert not unanswered, f"{len(unanswered)} of {len(legit)} legit jobs unanswered"


def test_a_reply_list_name_that_cannot_be_encoded_loses_no_other_callers_jobs(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, redis_client: redis.Redis
) -> None:
    """A message whose ``reply_to`` is our prefix and a lone surrogate (valid JSON, not valid
    UTF-8) sits between legit messages: it is refused as naming no reply list, and the worker
    still answers every legit job."""
    deployer.deploy("test", SOLO_SHOP, guests.ECHO)
    deployer.deploy("test", OTHER_SHOP, guests.ECHO)
    keys = pool_settings.keys
    worker = workers["r0"]
    _warm(redis_client, keys, 0, SOLO_SHOP, 1)
    _warm(redis_client, keys, 0, OTHER_SHOP, 1)
    # Another shop: back from idle, its job is run first of those pulled.
    _, hostile = _job_message(keys, 0, OTHER_SHOP, keys.replies("\ud800"))
    legit, replies = _hostile_among_legit(pool_settings, redis_client, worker, hostile)
    assert worker.alive
    unanswered = legit - set(replies)
    assert not unanswered, f"{len(unanswered)} of {len(legit)} legit jobs unanswered"


# -- several workers of one shard ----------------------------------------------------------------


def test_a_busy_worker_does_not_hoard_a_burst_while_another_worker_of_its_shard_idles(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, redis_client: redis.Redis
) -> None:
    """Two workers of shard 1, both paused: one is handed a short job, the other a long one,
    then forty medium jobs queue. Resumed, the forty are shared between the two workers (the
    one that ran the long job is free long before the forty are done): a worker that shares its
    shard holds only a few jobs ahead (``LOOKAHEAD_SHARED_JOBS``), not the whole burst."""
    keys = pool_settings.keys
    deployer.deploy("test", SHORT_SHOP, guests.ECHO)
    deployer.deploy("test", LONG_SHOP, LONG)
    deployer.deploy("test", MEDIUM_SHOP, MEDIUM)
    for shop in (SHORT_SHOP, LONG_SHOP, MEDIUM_SHOP):  # compiled on both workers: no compile below
        assert len(_warm(redis_client, keys, 1, shop, 6)) == 2
    # Each worker reads who else serves its shard with its own heartbeat (every HEARTBEAT_S):
    # two beats after the start, each has seen the other.
    time.sleep(max(0.0, 2 * Keys.HEARTBEAT_S + 0.5 - (time.monotonic() - STARTED[0])))
    # Three rounds: which worker BRPOP hands which first job to varies; each round must share.
    rounds = [_burst_round(redis_client, keys, workers["p1a"], workers["p1b"]) for _ in range(3)]
    assert all(len(split) == 2 and min(split.values()) >= 5 for split in rounds), rounds


def _burst_round(
    client: redis.Redis, keys: Keys, first: WorkerProcess, second: WorkerProcess
) -> dict[str, int]:
    """One round of the burst above: how many of the forty each worker ran."""
    queue = keys.queue(1)
    reply_to = keys.replies(uuid.uuid4().hex)
    time.sleep(0.5)  # both back in BRPOP after the last job
    firsts = []
    with _paused(first, second):
        for shop in (SHORT_SHOP, LONG_SHOP):  # one to each (both wait in BRPOP)
            job_id, message = _job_message(keys, 1, shop, reply_to)
            client.lpush(queue, message)
            firsts.append(job_id)
        burst = set()
        for _ in range(40):
            job_id, message = _job_message(keys, 1, MEDIUM_SHOP, reply_to)
            client.lpush(queue, message)
            burst.add(job_id)
    replies = _replies(client, reply_to, 42, 30)
    assert burst | set(firsts) <= set(replies)
    by_worker: dict[str, int] = {}
    for job_id in burst:
        by_worker[replies[job_id]["worker"]] = by_worker.get(replies[job_id]["worker"], 0) + 1
    return by_worker


def test_a_shop_with_a_quota_gets_the_same_answer_for_an_undefined_ep_as_one_without(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, redis_client: redis.Redis
) -> None:
    """A job at an EP that is not defined: a shop without quotas gets an execution whose error
    is the EP's; a shop with a quota must get the same (not a worker failure, which the client's
    breaker counts and usage never sees): a quota check that cannot read the shop's apps counts
    the call against the shop alone."""
    keys = pool_settings.keys
    set_quota(redis_client, keys, OTHER_SHOP, Quota(max_concurrent=5))
    reply_to = keys.replies(uuid.uuid4().hex)
    answers = {}
    for shop in (SOLO_SHOP, OTHER_SHOP):
        job_id, message = _job_message(keys, 0, shop, reply_to, ep="undefined")
        redis_client.lpush(keys.queue(0), message)
        answers[shop] = _replies(redis_client, reply_to, 1, 10)[job_id]
    assert answers[SOLO_SHOP]["execution"] is not None
    assert answers[OTHER_SHOP]["execution"] is not None, answers[OTHER_SHOP]["error"]


def test_a_deeply_nested_message_taken_by_celery_itself_leaves_the_worker_serving(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, redis_client: redis.Redis
) -> None:
    """The same hostile message pushed while the worker idles (so kombu's own BRPOP takes it,
    not the fair loop): the worker stays up and answers the next legit job (kombu's parsing is
    guarded: ``scriptpool.workers._transport``). Last in the module, in case it does not."""
    deployer.deploy("test", SOLO_SHOP, guests.ECHO)
    keys = pool_settings.keys
    worker = workers["r0"]
    _warm(redis_client, keys, 0, SOLO_SHOP, 1)
    redis_client.lpush(keys.queue(0), "[" * 100_000)
    time.sleep(3)  # measured: the worker exits about 2 s after it (Celery: "Unrecoverable error")
    assert worker.alive, worker.log()[-2000:]
    assert _warm(redis_client, keys, 0, SOLO_SHOP, 1)
