"""Whole-process wall time of the host import, against redis-py's own and a bare interpreter:
``.venv/bin/python scripts/bench_import.py [--runs 15]``. Medians, in ms."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def wall_ms(code: str, runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args().runs
    bare, redis_, client = (
        wall_ms(code, runs) for code in ("pass", "import redis", "from scriptpool.producer import Client")
    )
    print(
        f"interpreter {bare:.0f} ms, import redis {redis_:.0f} ms, "
        f"from scriptpool.producer import Client {client:.0f} ms (beyond redis: {client - redis_:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
