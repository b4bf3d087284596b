"""Small measuring helpers shared by the bench, the benchmark scripts and the tests, and the
trivial script they measure with."""

from __future__ import annotations

import os
import time
from pathlib import Path

# A trivial script: ignores its input and prints {}. The work is ours, not the guest's.
TRIVIAL_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const 2))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p95 and p99 of ``samples`` (nearest rank), rounded to 4 decimals; zeros when empty."""
    ordered = sorted(samples)
    if not ordered:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no VmRSS for pid {pid}")


def child_cpu_seconds() -> dict[int, tuple[str, float]]:
    """The CPU time (user + system, seconds) each child of this process has used so far, by pid,
    with its command line; empty where /proc cannot tell (not Linux)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    me = os.getpid()
    found: dict[int, tuple[str, float]] = {}
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return found
    for entry in entries:
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue  # it ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3
        if int(fields[1]) == me:
            command = argv.replace(b"\0", b" ").decode("utf-8", "replace").strip()
            found[int(entry)] = (command, (int(fields[11]) + int(fields[12])) / tick)
    return found


class CpuMeter:
    """CPU time used between :meth:`start` and :meth:`stop` by this process (all its threads)
    and by each of its children (what a private pool started: Redis, workers)."""

    def start(self) -> CpuMeter:
        self._own = time.process_time()
        self._children = child_cpu_seconds()
        return self

    def stop(self) -> dict[str, float]:
        """Seconds of CPU by role: ``this process``, and each child by a short name of its command
        (``redis``, ``workers``, ``other``), summed over processes of the same role."""
        used = {"this process": time.process_time() - self._own}
        for pid, (command, seconds) in child_cpu_seconds().items():
            before = self._children.get(pid, (command, 0.0))[1]
            role = (
                "redis" if "redis-server" in command
                else "workers" if "scriptpool.workers" in command
                else "other"
            )  # fmt: skip
            used[role] = used.get(role, 0.0) + max(seconds - before, 0.0)
        return used
