"""How far past its deadline a caller gets its fallback when no worker answers.

Run: .venv/bin/python scripts/bench_deadline.py [--calls 300] [--deadline-ms 20]
Starts a private Redis and no worker; each call uses its own shop so no breaker opens.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_engine import TRIVIAL  # noqa: E402

from scriptpool.config import Settings  # noqa: E402
from scriptpool.engine import Sandbox  # noqa: E402
from scriptpool.producer import Client  # noqa: E402
from scriptpool.registry import Registry  # noqa: E402
from scriptpool.testing import EmbeddedRedis  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--deadline-ms", type=float, default=20)
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, artifact_key=secrets.token_hex(32).encode(), shards=1)
        registry = Registry(redis.Redis.from_url(server.url), settings, Sandbox())
        registry.define_extension_point("t")
        for i in range(args.calls):
            registry.deploy("t", str(i), TRIVIAL)
        with Client(settings) as client:
            time.sleep(0.5)  # let the publisher connection warm up, as a long-lived client's is
            over = []
            for i in range(args.calls):
                started = time.perf_counter()
                outcome = client.run("t", str(i), {}, timeout=args.deadline_ms / 1000)
                over.append((time.perf_counter() - started) * 1000 - args.deadline_ms)
                assert outcome.error_code == "timeout", outcome
    over.sort()
    n = len(over)
    print(
        f"overshoot past a {args.deadline_ms:g} ms deadline over {n} calls: "
        f"p50 {over[n // 2]:.3f} ms, p99 {over[int(n * 0.99)]:.3f} ms, max {over[-1]:.3f} ms"
    )


if __name__ == "__main__":
    main()
