"""One process survives 10,000 hostile executions without growing its memory."""

from __future__ import annotations

import itertools

import pytest

from scriptpool.registry import Registry
from scriptpool.runtime import Executor
from tests import guests

HOSTILE = {
    "fuel": (guests.INFINITE_LOOP, "instruction_limit_exceeded"),
    "stack": (guests.RECURSION, "stack_overflow"),
    "memory": (guests.MEMORY_BOMB, "memory_limit_exceeded"),
    "trap": (guests.TRAP, "runtime_error"),
    "exit": (guests.writes(b"{}", b"bye", exit_code=2), "runtime_error"),
    "not-json": (guests.writes(b"nope"), "invalid_output"),
    "flood": (guests.OUTPUT_FLOOD, "output_too_large"),
}


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_rss_stays_flat_over_10000_hostile_runs(registry: Registry, executor: Executor) -> None:
    """10,000 hostile runs (7 kinds) in one process: every one named, RSS within +50 MB."""
    # A small fuel budget keeps the infinite loops cheap; the limit path is the same.
    registry.define_extension_point("hostile", limits={"fuel": 200_000})
    for name, (module, _) in HOSTILE.items():
        registry.deploy("hostile", name, module)
    registry.deploy("test", "good", guests.ECHO)
    kinds = itertools.cycle(HOSTILE.items())
    for _ in range(300):  # warm caches and allocator arenas before the baseline
        name, (_, code) = next(kinds)
        executor.execute("hostile", name, {})
    baseline = rss_bytes()
    for i in range(10_000):
        name, (_, code) = next(kinds)
        result = executor.execute("hostile", name, {})
        assert result.error is not None and result.error.code == code, (name, result.error)
        if i % 1000 == 0:
            assert executor.execute("test", "good", {"i": i}).output == {"i": i}
    growth = rss_bytes() - baseline
    assert growth < 50 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"


def test_every_outcome_gives_its_pooled_instance_back(registry: Registry, executor: Executor) -> None:
    """Each kind of run, failing or not, frees its store at once: more runs of each kind than the
    pool has instance slots, and a good script still starts afterwards."""
    from scriptpool.engine._engine import POOL_LIMITS

    registry.define_extension_point("hostile", limits={"fuel": 200_000})
    for name, (module, _) in HOSTILE.items():
        registry.deploy("hostile", name, module)
    registry.deploy("test", "good", guests.ECHO)
    for name, (_, code) in HOSTILE.items():
        for _ in range(POOL_LIMITS["total_core_instances"] + 1):
            result = executor.execute("hostile", name, {})
            assert result.error is not None and result.error.code == code, (name, result.error)
    assert executor.execute("test", "good", {"ok": 1}).output == {"ok": 1}
