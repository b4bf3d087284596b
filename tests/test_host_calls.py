"""Host calls do work bounded by what the script may still use, and their time is the run's.

A guest's arguments to a host call are input too: iovec counts past IOV_MAX are EINVAL, bytes are
copied only up to the room left under the output or log limit, random bytes come in slices
between which the deadline is checked, and a run that went past its wall-clock limit (in a host
call or after the last epoch check) is never reported ok. Each hostile run is followed by a good
one on the same sandbox.
"""

from __future__ import annotations

import hashlib
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from scriptpool.config import Limits
from scriptpool.engine import Sandbox, SandboxRun, _guest_io
from scriptpool.engine._guest_io import TRUNCATION_MARKER, GuestIO
from scriptpool.engine._wasi import IOV_MAX, SSIZE_MAX
from tests import guests

MEMORY = 156 * 65536  # the guests' memory: what the default 10,000 KiB limit holds
# Room for the guests to fill a million iovecs before their one host call, and memory to spare
# (a guest failing near its memory limit is reported as out of memory).
LIMITS = Limits(fuel=200_000_000, wall_ms=1000, memory_bytes=64 << 20)
# As many whole-memory iovecs as one call may name: their sum stays under a wasm32 ssize_t.
WIDE = SSIZE_MAX // MEMORY
EINVAL = 28
# What a run may allocate in Python beyond what its limits allow: bookkeeping, not payload.
ALLOCATION_SLACK = 256 * 1024


@pytest.fixture
def traced() -> Iterator[None]:
    """Python's allocations are traced for the length of the test."""
    tracemalloc.start()
    yield
    tracemalloc.stop()


@dataclass(frozen=True)
class RunFigures:
    """What a run cost the host: the peak of Python allocations during it, and its duration."""

    peak_bytes: int
    elapsed_s: float


def run(sandbox: Sandbox, wasm: bytes, limits: Limits = LIMITS) -> tuple[RunFigures, SandboxRun]:
    """Run ``wasm`` and measure what the run allocated in Python (peak) and how long it took."""
    module = sandbox.compile(wasm, limits.stack_bytes)
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    result = sandbox.run(module, b"{}", limits)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] - before
    return RunFigures(peak, elapsed), result


def still_healthy(sandbox: Sandbox) -> None:
    """The same sandbox runs a good script correctly right after."""
    result = sandbox.run(sandbox.compile(guests.ECHO, Limits().stack_bytes), b'{"ok":1}', Limits())
    assert (result.error, result.stdout) == (None, b'{"ok":1}')


@pytest.mark.usefixtures("traced")
def test_many_large_iovecs_to_stderr_copy_only_the_log_room(sandbox: Sandbox) -> None:
    """200 iovecs of 10 MiB each to one fd_write(2) (2 GB, joined before the log limit applied)
    keep what fits the log limit, count the rest as dropped, and allocate nothing near their size."""
    figures, result = run(sandbox, guests.iovec_flood("fd_write", 2, WIDE, MEMORY))
    assert result.error is None
    dropped = WIDE * MEMORY - LIMITS.log_bytes
    marker = TRUNCATION_MARKER.format(dropped=dropped)
    assert result.logs.endswith(marker)
    assert len(result.logs) - len(marker) == LIMITS.log_bytes  # one character per byte kept
    assert figures.peak_bytes < LIMITS.log_bytes + ALLOCATION_SLACK
    still_healthy(sandbox)


@pytest.mark.usefixtures("traced")
def test_many_large_iovecs_to_stdout_fail_before_anything_is_copied(sandbox: Sandbox) -> None:
    """The same on stdout is output_too_large, found from the iovecs' sum before any copy."""
    figures, result = run(sandbox, guests.iovec_flood("fd_write", 1, WIDE, MEMORY))
    assert result.error is not None and result.error.code == "output_too_large"
    assert result.stdout == b""
    assert figures.peak_bytes < ALLOCATION_SLACK
    still_healthy(sandbox)


@pytest.mark.parametrize("call", ["fd_write", "fd_read"])
@pytest.mark.parametrize("count", [IOV_MAX + 1, 1_200_000])
def test_iovec_counts_past_iov_max_are_einval(sandbox: Sandbox, call: str, count: int) -> None:
    """More iovecs than IOV_MAX (1.2 M empty ones took 3 to 4 s and 458 MB) get EINVAL, as
    writev and readv do, before any of them is read."""
    fd = 0 if call == "fd_read" else 2
    _, result = run(sandbox, guests.iovec_flood(call, fd, count, 0))
    assert result.error is not None and result.error.code == "runtime_error"
    assert result.error.detail["exit_code"] == EINVAL
    still_healthy(sandbox)


@pytest.mark.parametrize("fd", [1, 2])
def test_iovecs_adding_up_past_ssize_max_are_einval(sandbox: Sandbox, fd: int) -> None:
    """300 iovecs of 10 MiB (the 3 GB call that ran 14 s and was reported ok): their lengths add
    up past what a wasm32 ssize_t holds, so the call is EINVAL before anything is copied."""
    _, result = run(sandbox, guests.iovec_flood("fd_write", fd, 300, MEMORY))
    assert result.error is not None and result.error.code == "runtime_error"
    assert result.error.detail["exit_code"] == EINVAL
    still_healthy(sandbox)


def test_one_iovec_longer_than_ssize_max_is_einval(sandbox: Sandbox) -> None:
    """The single-iovec fast path holds the same bound: one 2 GiB buffer is EINVAL."""
    limits = Limits(memory_bytes=4 << 30)
    _, result = run(sandbox, guests.iovec_flood("fd_write", 2, 1, SSIZE_MAX + 1, pages=32769), limits)
    assert result.error is not None and result.error.code == "runtime_error"
    assert result.error.detail["exit_code"] == EINVAL
    still_healthy(sandbox)


@pytest.mark.parametrize("call", ["fd_write", "fd_read"])
def test_iov_max_iovecs_are_served(sandbox: Sandbox, call: str) -> None:
    """Up to IOV_MAX iovecs is the normal case, served as before."""
    fd = 0 if call == "fd_read" else 2
    _, result = run(sandbox, guests.iovec_flood(call, fd, IOV_MAX, 0))
    assert result.error is None
    still_healthy(sandbox)


@pytest.mark.usefixtures("traced")
def test_random_get_of_10_mib_stays_within_the_wall_limit(sandbox: Sandbox) -> None:
    """random_get(10 MiB) took 1.1 s and was reported ok. Now it is written into guest memory a
    slice at a time with the deadline checked between slices: either it finishes within the
    run's wall limit, or the run is wall_clock_exceeded; never ok past the limit."""
    limits = Limits(wall_ms=100, memory_bytes=LIMITS.memory_bytes)
    figures, result = run(sandbox, guests.random_flood(MEMORY), limits)
    error = result.error
    if error is None:
        assert (result.instantiate_s + result.run_s) * 1000 <= limits.wall_ms
    else:
        assert error.code == "wall_clock_exceeded"
    assert figures.peak_bytes < 8 * _guest_io.RANDOM_SLICE_BYTES + ALLOCATION_SLACK  # not the 10 MiB asked
    still_healthy(sandbox)


def test_the_random_stream_is_unchanged_by_slicing() -> None:
    """A run that asks for more than one slice sees the same stream as one made block by block
    (recorded runs replay exactly across this change)."""
    n = 3 * _guest_io.RANDOM_SLICE_BYTES + 17
    sliced = GuestIO(b"", 0, 0).random_bytes(n)
    blocks = b"".join(
        hashlib.sha256(_guest_io.RANDOM_SEED + i.to_bytes(8, "little")).digest() for i in range(-(-n // 32))
    )
    assert sliced == blocks[:n]


def test_host_call_time_counts_against_the_wall_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host call that outlasts the whole wall limit, followed by a clean exit with no epoch
    check in between, is wall_clock_exceeded, not ok."""
    limits = Limits(wall_ms=20)
    slow = GuestIO.random_into

    def slower(self: GuestIO, view: memoryview, at: int, n: int) -> None:
        time.sleep(3 * limits.wall_ms / 1000)
        slow(self, view, at, n)

    monkeypatch.setattr(GuestIO, "random_into", slower)
    sandbox = Sandbox()
    result = sandbox.run(sandbox.compile(guests.random_flood(16, pages=1), limits.stack_bytes), b"", limits)
    assert result.error is not None and result.error.code == "wall_clock_exceeded"
    monkeypatch.undo()
    still_healthy(sandbox)


def test_a_guest_looping_on_costly_host_calls_is_stopped_by_its_wall_limit(sandbox: Sandbox) -> None:
    """Whole-memory iovecs to stderr again and again, with fuel to spare: every host call
    checks the deadline, so the run ends as wall_clock_exceeded."""
    limits = Limits(fuel=10**12, wall_ms=50, memory_bytes=LIMITS.memory_bytes)
    _, result = run(sandbox, guests.iovec_flood("fd_write", 2, WIDE, MEMORY, forever=True), limits)
    assert result.error is not None and result.error.code == "wall_clock_exceeded"
    still_healthy(sandbox)
