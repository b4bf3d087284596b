"""One run's standard streams, deadline and fixed random stream: what the WASI host calls
(``engine/_wasi.py``) read and write, and what the sandbox reads back when the run ends.

Every stream is bounded: stdout past its limit fails the run before anything is copied, stderr
keeps what fits and counts the rest, and random bytes come in slices between which the run's
deadline is checked, so a host call does work bounded by what the run may still use.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scriptpool.config.errors import OutputTooLarge, WallClockExceeded

RANDOM_SEED = b"scriptpool-fixed-random"
TRUNCATION_MARKER = "\n…[logs truncated: {dropped} bytes dropped]"
# Random bytes are produced in slices of this many, the run's deadline checked between them.
RANDOM_SLICE_BYTES = 64 * 1024


@dataclass(slots=True)
class GuestIO:
    """The standard streams and random state of one execution, and its host-call state."""

    stdin: bytes
    output_limit: int
    log_limit: int
    stdin_offset: int = 0
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    logs_dropped: int = 0
    random_counter: int = 0
    # When the metered part of the run must end (time.perf_counter()); host calls check it.
    deadline: float = math.inf
    wall_ms: int = 0
    # The exception a host function raised; the sandbox re-raises it when the guest unwinds.
    raised: BaseException | None = None

    def start_clock(self, wall_ms: int) -> None:
        """From now on, the run (guest code and host calls alike) has ``wall_ms`` to finish."""
        self.wall_ms = wall_ms
        self.deadline = time.perf_counter() + wall_ms / 1000

    def check_deadline(self) -> None:
        """Raise :class:`WallClockExceeded` once the run is past its deadline."""
        if time.perf_counter() > self.deadline:
            raise WallClockExceeded(
                f"script ran past its {self.wall_ms} ms wall-clock deadline", limit=self.wall_ms
            )

    def reserve_stdout(self, length: int) -> None:
        """Fail the run, before anything is copied, if ``length`` more bytes of output do not fit."""
        if length > self.output_limit - len(self.stdout):
            raise OutputTooLarge(
                f"script wrote more than the {self.output_limit}-byte output limit",
                limit=self.output_limit,
            )

    def write_stdout(self, data: bytes) -> None:
        self.reserve_stdout(len(data))
        self.stdout += data

    def append_stdout(self, view: memoryview, vecs: list[tuple[int, int]]) -> int:
        """Append the buffers ``vecs`` of guest memory to stdout, all or (over the limit) none."""
        total = sum(length for _, length in vecs)
        self.reserve_stdout(total)
        for ptr, length in vecs:
            self.stdout += view[ptr : ptr + length]
        return total

    def log_room(self) -> int:
        return max(0, self.log_limit - len(self.stderr))

    def write_stderr(self, data: bytes) -> None:
        room = self.log_room()
        self.stderr += data[:room]
        self.logs_dropped += max(0, len(data) - room)

    def append_logs(self, view: memoryview, vecs: list[tuple[int, int]]) -> int:
        """Append what fits of the buffers ``vecs`` to the logs; count the rest as dropped."""
        room = self.log_room()
        total = 0
        for ptr, length in vecs:
            take = min(length, room)
            if take:
                self.stderr += view[ptr : ptr + take]
                room -= take
            self.logs_dropped += length - take
            total += length
        return total

    def logs(self) -> str:
        text = self.stderr.decode("utf-8", errors="replace")
        if self.logs_dropped:
            text += TRUNCATION_MARKER.format(dropped=self.logs_dropped)
        return text

    def random_bytes(self, n: int) -> bytes:
        out = bytearray(n)
        self.random_into(memoryview(out), 0, n)
        return bytes(out)

    def random_into(self, view: memoryview, at: int, n: int) -> None:
        """Write the next ``n`` bytes of the fixed random stream to ``view[at:]``, a slice at a
        time, checking the deadline between slices. Each call starts a new 32-byte block."""
        base = _SEEDED.copy
        end = at + n
        while at < end:
            self.check_deadline()
            stop = min(end, at + RANDOM_SLICE_BYTES)
            counter = self.random_counter
            blocks = -(-(stop - at) // 32)
            chunk = b"".join(_digest(base, i) for i in range(counter, counter + blocks))
            view[at:stop] = chunk[: stop - at]
            self.random_counter = counter + blocks
            at = stop

    def take_raised(self) -> BaseException | None:
        """The exception a host function raised since the last call, once."""
        raised, self.raised = self.raised, None
        return raised


_SEEDED = hashlib.sha256(RANDOM_SEED)


def _digest(seeded: Callable[[], Any], counter: int) -> bytes:
    block = seeded()
    block.update(counter.to_bytes(8, "little"))
    return bytes(block.digest())


IDLE = GuestIO(b"", 0, 0)  # no run in progress: nothing but the sandbox's runs calls us
