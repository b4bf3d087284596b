"""Every limit has a documented range, checked wherever a limit comes from: ``Limits`` itself (the
environment's defaults, a captured run), an extension point's overrides at ``ep define``, the
scale factor, the engine, and an EP record read raw from Redis by a real worker, which fails that
one job with ``configuration_error`` and goes on serving."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis

from scriptpool.config import ExtensionPoint, Limits, Settings, scaled_limits
from scriptpool.config.errors import ConfigurationError
from scriptpool.config.wire import Job, Reply
from scriptpool.engine import GuestProfiler, Sandbox
from scriptpool.producer._publisher import TaskPublisher
from scriptpool.registry import Registry
from tests import guests
from tests.conftest import ROOT
from tests.pool import WorkerProcess, pid_of, pool_fixtures, shop_on
from tests.test_cli import USAGE, cli_env, one_line, run_cli

__all__ = ["cli_env"]  # a fixture this module uses, imported from the CLI tests

KIB, MIB, GIB = 1024, 2**20, 2**30
# The documented ranges (README, Limits and named errors), inclusive. Written out here rather than
# imported, so that a change to them is a deliberate change to this table too.
RANGES = {
    "fuel": (1, 2**63 - 1),
    "memory_bytes": (64 * KIB, 4 * GIB),
    "stack_bytes": (16 * KIB, 1 * MIB),
    "input_bytes": (1, 16 * MIB),
    "output_bytes": (1, 16 * MIB),
    "log_bytes": (1, 1 * MIB),
    "module_bytes": (8, 64 * MIB),
    "wall_ms": (1, 60_000),
}

# Values an attacker with write access to Redis can put into an EP record's limit overrides, each
# with the limit the refusal must name: the findings of issue 20 (a 4 MiB stack that aborted the
# worker in wasmtime, fuel past 64 bits, a 1e14 ms wall clock, 1 TiB of memory) and every JSON type
# a limit is not.
HOSTILE_OVERRIDES: dict[str, tuple[Any, str]] = {
    "stack 4 MiB": ({"stack_bytes": 4 * MIB}, "stack_bytes"),
    "fuel 2^64+5": ({"fuel": 2**64 + 5}, "fuel"),
    "wall_ms 1e14": ({"wall_ms": 10**14}, "wall_ms"),
    "memory 1 TiB": ({"memory_bytes": 2**40}, "memory_bytes"),
    "a string": ({"fuel": "11000000"}, "fuel"),
    "a float": ({"wall_ms": 100.5}, "wall_ms"),
    "a nested object": ({"stack_bytes": {"bytes": 4 * MIB}}, "stack_bytes"),
    "a negative": ({"memory_bytes": -1}, "memory_bytes"),
    "a boolean": ({"output_bytes": True}, "output_bytes"),
    "overrides not an object": ("fuel", "limit overrides"),
}


# -- Limits: each range, both edges ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RANGES))
def test_each_limit_takes_both_edges_of_its_range(name: str) -> None:
    """The smallest and the largest value of each documented range are accepted as they are."""
    low, high = RANGES[name]
    assert getattr(Limits(**{name: low}), name) == low
    assert getattr(Limits(**{name: high}), name) == high


@pytest.mark.parametrize("name", sorted(RANGES))
def test_each_limit_refuses_one_past_either_edge_naming_the_limit_and_range(name: str) -> None:
    """One below the minimum and one above the maximum: a ConfigurationError naming the limit and
    both ends of its range."""
    low, high = RANGES[name]
    for value in (low - 1, high + 1):
        with pytest.raises(ConfigurationError) as caught:
            Limits(**{name: value})
        assert caught.value.detail["limit"] == name
        assert name in caught.value.message
        assert str(low) in caught.value.message and str(high) in caught.value.message


@pytest.mark.parametrize("value", ["100", 100.0, True, None, {"v": 100}, [100]])
def test_a_limit_that_is_no_integer_is_refused(value: object) -> None:
    """Text, floats (even whole ones), booleans, null, objects and lists are not limits."""
    with pytest.raises(ConfigurationError, match="wall_ms"):
        Limits(wall_ms=value)  # type: ignore[arg-type]


def test_the_ranges_are_the_documented_ones() -> None:
    """The table above is config's, and the README's limits table shows every range."""
    from scriptpool.config.limits import LIMIT_RANGES

    assert LIMIT_RANGES == RANGES
    assert set(RANGES) == set(Limits().as_dict())  # a new limit needs a range too
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Limits and named errors") : readme.index("### Scaled limits")]
    for name, (low, high) in RANGES.items():
        rows = [line for line in section.splitlines() if line.startswith("| `") and f"`{name}`" in line]
        assert len(rows) == 1 and f"| {low:,} to {high:,}" in rows[0], (name, rows)


def test_overrides_and_environment_are_range_checked() -> None:
    """``with_overrides`` and ``SCRIPTPOOL_LIMIT_*`` go through the same ranges; the variable is
    named."""
    with pytest.raises(ConfigurationError, match="stack_bytes"):
        Limits().with_overrides({"stack_bytes": 4 * MIB})
    with pytest.raises(ConfigurationError, match="SCRIPTPOOL_LIMIT_STACK_BYTES"):
        Settings.from_env({"SCRIPTPOOL_LIMIT_STACK_BYTES": str(4 * MIB)})
    assert Settings.from_env({"SCRIPTPOOL_LIMIT_WALL_MS": "60000"}).limits.wall_ms == 60_000


# -- scaled limits: clamped to the range ---------------------------------------------------------


def test_scaled_limits_are_clamped_to_the_maximum() -> None:
    """A factor never takes a limit past its maximum: the limit stops at it (the run is not
    refused), and the largest input any factor allows stops at the input maximum too."""
    from scriptpool.config import largest_input_bytes

    top = Limits(fuel=RANGES["fuel"][1], input_bytes=8 * MIB, output_bytes=RANGES["output_bytes"][1])
    scaled = scaled_limits(top, 10.0)
    assert scaled.fuel == RANGES["fuel"][1]
    assert scaled.input_bytes == RANGES["input_bytes"][1]  # 80 MiB clamped to 16 MiB
    assert scaled.output_bytes == RANGES["output_bytes"][1]
    assert largest_input_bytes(top) == RANGES["input_bytes"][1]
    base = Limits()
    assert scaled_limits(base, 2.0).fuel == 2 * base.fuel  # within the range: unchanged rule


# -- EP records as read from Redis -------------------------------------------------------------


def _record(limit_overrides: Any, **fields: Any) -> str:
    return json.dumps({"name": "hostile", "limit_overrides": limit_overrides, **fields})


@pytest.mark.parametrize("case", sorted(HOSTILE_OVERRIDES))
def test_an_ep_record_with_hostile_limits_is_a_configuration_error(case: str) -> None:
    """Reading an EP whose overrides are out of range or of the wrong type raises the named
    error, naming the limit (not a crash later, in wasmtime or ctypes)."""
    overrides, named = HOSTILE_OVERRIDES[case]
    with pytest.raises(ConfigurationError, match=named):
        ExtensionPoint.from_json(_record(overrides))


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        "5",
        '{"limit_overrides": {}}',  # no name
        json.dumps({"name": 7}),
        _record({}, reducer=5, combine="join"),
        _record({}, input_validation_rate="often"),
        _record({}, input_schema="not a schema"),
        "[" * 100_000 + "]" * 100_000,  # deeper than the JSON decoder recurses
    ],
)
def test_a_malformed_ep_record_is_a_configuration_error(raw: str) -> None:
    """Whatever bytes sit at an EP's key, reading them gives ConfigurationError or an EP."""
    with pytest.raises(ConfigurationError):
        ExtensionPoint.from_json(raw)


# -- the engine --------------------------------------------------------------------------------


def test_no_stack_size_can_abort_the_process_in_wasmtime() -> None:
    """wasmtime aborts the process (a Rust panic) for a Wasm stack past its async stack: the
    engine refuses such a size with ConfigurationError first. In a child process, since before
    the fix the abort took the test runner with it."""
    code = (
        "from scriptpool.engine import Sandbox\n"
        "from scriptpool.config.errors import ConfigurationError\n"
        "try:\n"
        f"    Sandbox().engine({4 * MIB})\n"
        "except ConfigurationError as exc:\n"
        "    print(exc.code, exc.message)\n"
    )
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.startswith("configuration_error") and "stack_bytes" in child.stdout


def test_the_engine_honours_every_limit_at_both_ends_of_its_range(sandbox: Sandbox) -> None:
    """A run with every limit at its maximum (2^63-1 fuel, 4 GiB memory, 1 MiB stack, 60 s)
    succeeds, profiled or not; with every limit at its minimum it fails by name, and the next
    run is correct."""
    top = Limits(**{name: high for name, (_, high) in RANGES.items()})
    echo = sandbox.compile(guests.ECHO, top.stack_bytes)
    assert sandbox.run(echo, b'{"a":1}', top).stdout == b'{"a":1}'
    profiled = sandbox.run(echo, b'{"a":1}', top, profiler=GuestProfiler(10))
    assert profiled.error is None and profiled.stdout == b'{"a":1}'
    bottom = Limits(**{name: low for name, (low, _) in RANGES.items()})
    tiny = sandbox.run(sandbox.compile(guests.ECHO, bottom.stack_bytes), b'{"a":1}', bottom)
    assert tiny.error is not None and tiny.error.code in (
        "memory_limit_exceeded",
        "instruction_limit_exceeded",
    )
    after = sandbox.run(sandbox.compile(guests.ECHO, Limits().stack_bytes), b'{"b":2}', Limits())
    assert after.error is None and after.stdout == b'{"b":2}'


def test_the_largest_stack_overflows_cleanly_in_a_profiled_run(sandbox: Sandbox) -> None:
    """A profiled run is an async call on a fiber of wasmtime's async stack size; at the largest
    Wasm stack a recursion still ends in ``stack_overflow``, with room left for our host frames
    (a stack equal to the async stack aborted the process: measured, see README)."""
    high = RANGES["stack_bytes"][1]
    module = sandbox.compile(guests.RECURSION, high)
    limits = Limits(stack_bytes=high, fuel=10**9, wall_ms=30_000)
    run = sandbox.run(module, b"", limits, profiler=GuestProfiler(10_000))
    assert run.error is not None and run.error.code == "stack_overflow"
    ok = sandbox.run(sandbox.compile(guests.ECHO, high), b'{"a":1}', limits)
    assert ok.error is None and ok.stdout == b'{"a":1}'


# -- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "named"),
    [
        ('{"stack_bytes": 4194304}', "stack_bytes"),
        ('{"fuel": 18446744073709551621}', "fuel"),
        ('{"wall_ms": 1e14}', "wall_ms"),
        ('{"memory_bytes": 1099511627776}', "memory_bytes"),
        ('{"wall_ms": 0}', "wall_ms"),
    ],
)
def test_ep_define_refuses_an_out_of_range_limit_in_one_line(
    cli_env: str, capsys: pytest.CaptureFixture[str], limits: str, named: str
) -> None:
    """``ep define --limits`` with a value out of range: one ``invalid_argument`` line naming the
    limit and its range, exit 2, and nothing defined."""
    line = one_line(capsys, ["ep", "define", "checkout", "--limits", limits], USAGE)
    low, high = RANGES[named]
    assert line.startswith("scriptpool: invalid_argument: "), line
    assert named in line and str(low) in line and str(high) in line, line
    assert redis.Redis.from_url(cli_env).get("sp:ep:checkout") is None


def test_deploy_to_an_ep_with_a_hostile_record_is_one_line(cli_env: str, tmp_path: Path) -> None:
    """An EP record overwritten in Redis with a 4 MiB stack: ``deploy`` exits 2 with one
    ``configuration_error`` line naming the limit (it aborted with exit 134 and a Rust backtrace)."""
    store = redis.Redis.from_url(cli_env)
    store.set("sp:ep:checkout", _record({"stack_bytes": 4 * MIB}))
    module = tmp_path / "echo.wasm"
    module.write_bytes(guests.ECHO)
    result = run_cli(["deploy", "checkout", "1", str(module)])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == USAGE, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("scriptpool: configuration_error: "), result.stderr
    assert "stack_bytes" in lines[0]


# -- a real worker ------------------------------------------------------------------------------

SHARDS = 1
pool_settings, workers = pool_fixtures(SHARDS, {"limits0": [0]})
SHOP = shop_on(0, SHARDS)


def send(settings: Settings, ep: str, payload: bytes, timeout_s: float = 10.0) -> Reply | None:
    """One job straight onto the shard's queue, as a client that skips its own EP check would
    send it, and the worker's reply (None if none came within ``timeout_s``)."""
    store = redis.Redis.from_url(settings.redis_url)
    reply_to = settings.keys.replies(uuid.uuid4().hex)
    now = time.time()
    job = Job(uuid.uuid4().hex, ep, SHOP, payload, deadline=now + timeout_s, enqueued_at=now)
    TaskPublisher(store, settings.keys.TASK).publish(
        job.id, [job.to_wire()], {}, queue=settings.keys.queue(0), reply_to=reply_to, argsrepr="test"
    )
    popped = None
    deadline = time.monotonic() + timeout_s
    while popped is None and time.monotonic() < deadline:
        popped = store.blpop([reply_to], timeout=0.5)
    store.close()
    return None if popped is None else Reply.from_wire(msgpack.unpackb(popped[1]))


@pytest.fixture(scope="module")
def pool(pool_settings: Settings, workers: dict[str, WorkerProcess]) -> Iterator[Registry]:
    """The registry of the pool's Redis, with ECHO at ``good`` for the test shop."""
    store = redis.Redis.from_url(pool_settings.redis_url)
    store.flushdb()
    registry = Registry(store, pool_settings, Sandbox())
    registry.define_extension_point("good")
    registry.deploy("good", SHOP, guests.ECHO)
    yield registry
    store.close()


@pytest.mark.parametrize("case", sorted(HOSTILE_OVERRIDES))
def test_a_worker_fails_only_the_job_of_an_ep_with_hostile_limits(
    pool: Registry, pool_settings: Settings, workers: dict[str, WorkerProcess], case: str
) -> None:
    """The EP record is overwritten raw in Redis after a clean deploy: that EP's job gets
    ``configuration_error`` naming the limit, the worker pid is unchanged, and a good script runs
    right after on the same worker."""
    overrides, named = HOSTILE_OVERRIDES[case]
    ep = f"hostile-{sorted(HOSTILE_OVERRIDES).index(case)}"  # never read before: nothing cached
    pool.define_extension_point(ep)
    pool.deploy(ep, SHOP, guests.ECHO)
    store = redis.Redis.from_url(pool_settings.redis_url)
    store.set(pool_settings.keys.extension_point(ep), _record(overrides))
    before = send(pool_settings, "good", b'{"before":true}')
    assert before is not None and before.execution is not None and before.execution.ok

    hostile = send(pool_settings, ep, b'{"x":1}')
    assert workers["limits0"].alive, workers["limits0"].log()[-3000:]
    assert hostile is not None, "no reply to the hostile EP's job"
    assert hostile.execution is not None and hostile.error is None, hostile
    assert not hostile.execution.ok
    assert hostile.execution.error is not None
    assert hostile.execution.error.code == "configuration_error", hostile.execution.error
    assert named in hostile.execution.error.message

    after = send(pool_settings, "good", b'{"after":true}')
    assert after is not None and after.execution is not None and after.execution.ok
    assert after.execution.output == {"after": True}
    assert pid_of(after.worker) == pid_of(before.worker) == workers["limits0"].process.pid
