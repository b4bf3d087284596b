"""Scenario 14: a setting cannot take a worker. Hostile extension-point records written raw into
Redis for a real worker, and short, placeholder or published artifact keys given to a worker and
to a deploy, while the pool serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import msgpack
import pytest
import redis

from scriptpool.config import Settings
from scriptpool.config.errors import ConfigurationError
from scriptpool.config.wire import Job, Reply
from scriptpool.producer._publisher import TaskPublisher
from scriptpool.registry import Registry
from scriptpool.testing import worker_argv
from tests import guests
from tests.conftest import ROOT, deployer_fixture
from tests.faults.conftest import Recorder
from tests.pool import WorkerProcess, pid_of, pool_fixtures, shop_on

SHARDS = 1
settings, workers = pool_fixtures(SHARDS, {"boundary0": [0]}, redis="private_redis", settings="settings")
TITLE = "A setting cannot take a worker"
SHOP = shop_on(0, SHARDS, prefix="boundary")
MIB = 2**20
# A job's refusal is a Redis read and a JSON parse; a worker has this long to answer each (the
# bound is the test's patience, not a speed claim: a dead worker never answers).
ANSWER_S = 10.0


def _overrides(value: object) -> str:
    return json.dumps({"name": "hostile", "limit_overrides": value})


# What sits at the EP's key in Redis, by value class, and what the refusal must name. Every class
# of the limits of issue 20 (a 4 MiB stack aborted the worker in wasmtime; fuel past 64 bits was a
# worker_error from ctypes), every JSON type a limit is not, and records that are no record.
HOSTILE_RECORDS: dict[str, tuple[str, str]] = {
    "stack 4 MiB": (_overrides({"stack_bytes": 4 * MIB}), "stack_bytes"),
    "stack 0": (_overrides({"stack_bytes": 0}), "stack_bytes"),
    "fuel 2^64+5": (_overrides({"fuel": 2**64 + 5}), "fuel"),
    "wall_ms 1e14": (_overrides({"wall_ms": 10**14}), "wall_ms"),
    "memory 1 TiB": (_overrides({"memory_bytes": 2**40}), "memory_bytes"),
    "input 1 GiB": (_overrides({"input_bytes": 2**30}), "input_bytes"),
    "a string": (_overrides({"fuel": "11000000"}), "fuel"),
    "a float": (_overrides({"wall_ms": 100.5}), "wall_ms"),
    "a nested object": (_overrides({"stack_bytes": {"bytes": 4 * MIB}}), "stack_bytes"),
    "a negative": (_overrides({"memory_bytes": -1}), "memory_bytes"),
    "a boolean": (_overrides({"output_bytes": True}), "output_bytes"),
    "overrides a list": (_overrides([["fuel", 5]]), "limit overrides"),
    "an unknown limit": (_overrides({"fuel": 5, "gas": 5}), "unknown limit"),
    "record not JSON": ("\udcff not json", "definition"),
    "record a list": ("[1, 2]", "definition"),
    "record 100,000 deep": ("[" * 100_000 + "]" * 100_000, "definition"),
    "record without name": (json.dumps({"limit_overrides": {}}), "name"),
    "validation rate text": (
        json.dumps({"name": "hostile", "input_validation_rate": "often"}),
        "input_validation_rate",
    ),
}


def _send(settings: Settings, ep: str, payload: bytes) -> tuple[Reply | None, float]:
    """One job straight onto the shard's queue (as a client that skips its own EP check would
    send it): the worker's reply, or None within ANSWER_S, and how long it took in ms."""
    store = redis.Redis.from_url(settings.redis_url)
    reply_to = settings.keys.replies(uuid.uuid4().hex)
    started = time.monotonic()
    now = time.time()
    job = Job(uuid.uuid4().hex, ep, SHOP, payload, deadline=now + ANSWER_S, enqueued_at=now)
    TaskPublisher(store, settings.keys.TASK).publish(
        job.id, [job.to_wire()], {}, queue=settings.keys.queue(0), reply_to=reply_to, argsrepr="boundary"
    )
    popped = None
    while popped is None and time.monotonic() - started < ANSWER_S:
        popped = store.blpop([reply_to], timeout=0.5)
    store.close()
    elapsed_ms = (time.monotonic() - started) * 1000
    return (None if popped is None else Reply.from_wire(msgpack.unpackb(popped[1]))), elapsed_ms


# The pool's registry, with ECHO at ``good`` for the test shop.
deployer = deployer_fixture(
    ["good"], settings="settings", scope="module", deploy={("good", SHOP): guests.ECHO}
)


def test_hostile_ep_records_fail_their_jobs_by_name_and_the_worker_serves_on(
    settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, reliability: Recorder
) -> None:
    """Each hostile record is written raw over a cleanly defined EP with a deployed script: that
    EP's job gets ``configuration_error`` naming what is wrong, the worker pid is unchanged, and a
    good script runs right after on the same worker. ``ep define`` mends a broken EP at once."""
    worker = workers["boundary0"]
    store = redis.Redis.from_url(settings.redis_url)
    codes: dict[str, str] = {}
    slowest_refusal = 0.0
    good_ok = 0
    pids = {worker.process.pid}
    for n, (case, (raw, named)) in enumerate(HOSTILE_RECORDS.items()):
        ep = f"hostile-{n}"  # never read by the worker before: nothing of it is cached
        deployer.define_extension_point(ep)
        deployer.deploy(ep, SHOP, guests.ECHO)
        store.set(settings.keys.extension_point(ep), raw.encode(errors="surrogateescape"))

        hostile, elapsed = _send(settings, ep, b'{"x":1}')
        assert worker.alive, f"{case}: the worker died: {worker.log()[-3000:]}"
        assert hostile is not None and hostile.execution is not None, f"{case}: {hostile}"
        error = hostile.execution.error
        assert error is not None and not hostile.execution.ok, f"{case}: {hostile.execution}"
        assert error.code == "configuration_error" and named in error.message, f"{case}: {error}"
        assert ep in error.message, error.message
        codes[case] = error.code
        slowest_refusal = max(slowest_refusal, elapsed)

        good, _ = _send(settings, "good", json.dumps({"after": case}).encode())
        assert good is not None and good.execution is not None and good.execution.ok, f"{case}: {good}"
        assert good.execution.output == {"after": case}
        pids.add(pid_of(good.worker))
        pids.add(pid_of(hostile.worker))
        good_ok += 1

    deployer.define_extension_point("hostile-0")  # the 4 MiB stack's EP, defined again
    mended, _ = _send(settings, "hostile-0", b'{"mended":true}')
    assert mended is not None and mended.execution is not None and mended.execution.ok, mended
    assert pids == {worker.process.pid} and worker.alive
    store.close()

    reliability(
        14,
        TITLE,
        load=(
            "one solo worker on one shard; before and after each hostile job, a job of a good EP"
            " (ECHO) on the same worker"
        ),
        fault=(
            f"{len(HOSTILE_RECORDS)} extension-point records written raw into Redis over a cleanly"
            f" defined and deployed EP, one job each: {', '.join(HOSTILE_RECORDS)}"
        ),
        asserted=(
            "each hostile EP's job answered configuration_error naming the EP and what is wrong; the"
            " good job after each correct; one worker pid throughout; `ep define` mends the EP at once"
        ),
        figures={
            "hostile records answered configuration_error": f"{len(codes)} of {len(HOSTILE_RECORDS)}",
            "good jobs correct right after one": f"{good_ok} of {len(HOSTILE_RECORDS)}",
            "worker pids seen": len(pids),
            "worker deaths": int(not worker.alive),
            f"slowest refusal, ms (bound {ANSWER_S * 1000:,.0f})": round(slowest_refusal, 1),
        },
    )


# Keys nobody may sign with: too short, a placeholder, and the one docker-compose.yml published
# (put together here so that this file does not publish it again).
BAD_KEYS = {
    "short (24 bytes)": b"short-but-random-8f3a9c1",
    "placeholder (64 x 'x')": b"x" * 64,
    "published (old compose key)": "-".join(["change", "me", "to", "32", "random", "bytes", "0000"]).encode(),
}


def test_bad_artifact_keys_are_refused_by_workers_and_deploys_while_the_pool_serves(
    settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, reliability: Recorder
) -> None:
    """With each bad key: a new worker for the same shard refuses to start (exit 2, one line
    naming SCRIPTPOOL_ARTIFACT_KEY, before consuming anything), and ``scriptpool deploy`` refuses
    (exit 2, one line, nothing bound). The running worker keeps its pid and serves throughout."""
    worker = workers["boundary0"]
    before = deployer.bindings("good", SHOP).only()
    refused_workers = refused_deploys = 0
    slowest_refusal = 0.0
    module = ROOT / "examples" / "wat" / "hello.wat"
    for name, key in BAD_KEYS.items():
        with pytest.raises(ConfigurationError):
            settings.replace(artifact_key=key).require_artifact_key()
        env = {**os.environ, **settings.replace(artifact_key=key).to_env(), "PYTHONPATH": str(ROOT)}
        started = time.monotonic()
        celery = subprocess.run(
            worker_argv(settings, [0], name=f"badkey{refused_workers}@test", loglevel="INFO", events=False),
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        slowest_refusal = max(slowest_refusal, time.monotonic() - started)
        lines = celery.stderr.strip().splitlines()
        assert celery.returncode == 2 and len(lines) == 1, f"{name}: {celery.stderr[-2000:]}"
        assert "configuration_error: SCRIPTPOOL_ARTIFACT_KEY" in lines[0], lines
        refused_workers += 1

        deploy = subprocess.run(
            [sys.executable, "-m", "scriptpool", "deploy", "good", SHOP, str(module)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = deploy.stderr.strip().splitlines()
        assert deploy.returncode == 2 and len(lines) == 1, f"{name}: {deploy.stderr[-2000:]}"
        assert lines[0].startswith("scriptpool: configuration_error: SCRIPTPOOL_ARTIFACT_KEY "), lines
        assert "scriptpool key generate" in lines[0]
        refused_deploys += 1

        served, _ = _send(settings, "good", json.dumps({"key": name}).encode())
        assert served is not None and served.execution is not None and served.execution.ok, served
        assert served.execution.output == {"key": name}
        assert pid_of(served.worker) == worker.process.pid

    assert deployer.bindings("good", SHOP).only() == before  # no deploy landed
    assert worker.alive

    reliability(
        14,
        TITLE,
        load="the same worker answering a good job after each refusal",
        fault=(
            "artifact keys given to a new worker for the same shard and to `scriptpool deploy`: "
            + ", ".join(BAD_KEYS)
        ),
        asserted=(
            "each worker refused to start (exit 2, one line naming SCRIPTPOOL_ARTIFACT_KEY); each deploy"
            " refused (exit 2, one line saying how to make a key), nothing bound; the running worker's pid"
            " unchanged and serving"
        ),
        figures={
            "workers refused to start": f"{refused_workers} of {len(BAD_KEYS)}",
            "deploys refused": f"{refused_deploys} of {len(BAD_KEYS)}",
            "deploys that landed": 0,
            "slowest worker refusal, s": round(slowest_refusal, 2),
        },
    )
