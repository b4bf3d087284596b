"""Engines per Wasm stack size: every stack limit an EP may set maps to one of a few engines, so
no sequence of EP definitions can exhaust a worker's address space or memory mappings."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from scriptpool.config.limits import LIMIT_RANGES
from scriptpool.engine import engine_stack_bytes


def test_every_stack_limit_maps_to_one_of_seven_engine_classes() -> None:
    """Powers of two from 16 KiB to 1 MiB, each at least the limit asked for."""
    low, high = LIMIT_RANGES["stack_bytes"]
    classes = {engine_stack_bytes(n) for n in range(low, high + 1, 1024)} | {engine_stack_bytes(high)}
    assert classes == {1 << k for k in range(14, 21)}
    assert all(engine_stack_bytes(n) >= n for n in (low, low + 1, 300_000, high - 1, high))


def test_forty_distinct_stack_limits_run_in_one_process() -> None:
    """40 EP stack limits, all in range, each run once in one process: the 33rd distinct engine
    used to pass vm.max_map_count (each pooled engine mapped 1,000 fiber stacks) and abort the
    process. It runs a good script after, and holds at most seven engines. In a child process,
    so that an abort fails this test instead of ending the session."""
    code = textwrap.dedent(
        """
        from scriptpool.config import Limits
        from scriptpool.engine import Sandbox
        from tests import guests
        sandbox = Sandbox()
        for i in range(40):
            limits = Limits(stack_bytes=256 * 1024 + 4096 * i)
            run = sandbox.run(sandbox.compile(guests.ECHO, limits.stack_bytes), b'{"i":1}', limits)
            assert (run.error, run.stdout) == (None, b'{"i":1}'), run.error
        print(len(sandbox._engines))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.strip()) <= 7
