"""Small measuring helpers shared by the bench, the benchmark scripts and the tests, and the
trivial script they measure with."""

from __future__ import annotations

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
