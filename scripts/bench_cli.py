"""Wall time of the installed command line against a private Redis and one solo worker:
``.venv/bin/python scripts/bench_cli.py [--runs 7]``. Medians, in ms."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scriptpool.testing import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
SCRIPTPOOL = str(Path(sys.executable).parent / "scriptpool")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    with EmbeddedRedis() as server:
        env = {**os.environ, "SCRIPTPOOL_REDIS_URL": server.url, "SCRIPTPOOL_SHARDS": "1"}
        env["SCRIPTPOOL_ARTIFACT_KEY"] = secrets.token_hex(32)
        subprocess.run([SCRIPTPOOL, "ep", "define", "hello"], env=env, check=True, capture_output=True)
        worker = subprocess.Popen(
            [SCRIPTPOOL, "worker", "--shards", "0"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while subprocess.run([SCRIPTPOOL, "status"], env=env, capture_output=True).returncode != 0:
                time.sleep(0.2)
            hello = str(ROOT / "examples" / "wat" / "hello.wat")
            for argv in (
                ["--version"],
                ["status"],
                ["deploy", "hello", "1", hello],
                ["run", "hello", "1", "--timeout-ms", "2000", "--json"],
            ):
                samples, out = [], ""
                for _ in range(runs):
                    started = time.perf_counter()
                    done = subprocess.run(
                        [SCRIPTPOOL, *argv], env=env, capture_output=True, text=True, check=True
                    )
                    samples.append(time.perf_counter() - started)
                    out = done.stdout
                note = (
                    f" (the outcome: {json.loads(out)['timings']['total_ms']:.1f} ms)"
                    if argv[0] == "run"
                    else ""
                )
                print(f"scriptpool {' '.join(argv)}: {statistics.median(samples) * 1000:.0f} ms{note}")
        finally:
            worker.terminate()
            worker.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
