"""Scenario 12: guests that attack the host through its host calls, or fail in ways that had no
name, through a real worker, with a neighbour shop on the same shard calling all along."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from scriptpool.config import Limits, Settings
from scriptpool.engine._guest_io import RANDOM_SLICE_BYTES
from scriptpool.engine._wasi import IOV_MAX
from scriptpool.producer import BreakerPolicy, Client
from scriptpool.registry import Registry
from scriptpool.testing import rss_mb
from tests import guests
from tests.conftest import deployer_fixture
from tests.faults.conftest import Recorder
from tests.pool import WorkerProcess, pid_of, pool_fixtures, shop_on
from tests.test_named_failures import GC_HEAP_BOMB, UNCAUGHT, nested

SHARDS = 1
settings, pool = pool_fixtures(SHARDS, {"boundary": [0]}, redis="private_redis", settings="settings")
TITLE = "Hostile host calls and unnamed failures"
NO_BREAKER = BreakerPolicy(error_threshold=10**9)
MEMORY = 156 * 65536  # what the default 10,000 KiB memory limit holds
WIDE = ((1 << 31) - 1) // MEMORY  # whole-memory iovecs whose sum still fits a wasm32 ssize_t
# The default limits, but fuel for a guest to fill a million iovecs before its one host call, and
# memory to spare (a guest failing near its memory limit is reported as out of memory).
LIMITS = {"fuel": 200_000_000, "memory_bytes": 64 << 20}
WALL_MS = Limits().wall_ms
EINVAL = 28
UNIQUE_FLOOD = json.dumps([{"a": i % 1_899} for i in range(1_900)], separators=(",", ":")).encode()  # < 20 KB
ROUNDS = 3  # each kind, one after the other, this many times
DEADLINE_S = 5.0  # the callers' deadline: far past any limit, so every answer is the worker's

# kind: (EP, module, the error code it must get, the detail it must carry). "boundary" has room to
# fill a million iovecs; "test" has the default limits.
KINDS: dict[str, tuple[str, bytes, str, dict[str, object]]] = {
    # Logs kept to the log limit, the rest counted; it writes no output, so invalid_output.
    "stderr: 200 iovecs of 10 MiB": (
        "boundary", guests.iovec_flood("fd_write", 2, WIDE, MEMORY), "invalid_output", {},
    ),
    "stdout: 200 iovecs of 10 MiB": (
        "boundary", guests.iovec_flood("fd_write", 1, WIDE, MEMORY), "output_too_large", {},
    ),
    "stderr: 300 iovecs of 10 MiB (3 GB)": (
        "boundary", guests.iovec_flood("fd_write", 2, 300, MEMORY), "runtime_error", {"exit_code": EINVAL},
    ),
    "fd_write: 1.2 M empty iovecs": (
        "boundary", guests.iovec_flood("fd_write", 2, 1_200_000, 0), "runtime_error", {"exit_code": EINVAL},
    ),
    "fd_read: 1.2 M empty iovecs": (
        "boundary", guests.iovec_flood("fd_read", 0, 1_200_000, 0), "runtime_error", {"exit_code": EINVAL},
    ),
    "fd_write loop of IOV_MAX iovecs": (
        "boundary", guests.iovec_flood("fd_write", 2, IOV_MAX, 4096, forever=True), "wall_clock_exceeded", {},
    ),
    "random_get(10 MiB)": ("boundary", guests.random_flood(MEMORY), "wall_clock_exceeded", {}),
    "GC heap bomb": ("test", GC_HEAP_BOMB, "memory_limit_exceeded", {"trap_code": "gc_heap_out_of_memory"}),
    "uncaught Wasm exception": ("test", UNCAUGHT, "runtime_error", {"trap_code": "uncaught_exception"}),
    "output nested 600 deep": ("test", guests.writes(nested(600).encode()), "invalid_output", {"limit": 128}),
    # 1,900 small objects, the last a duplicate, under an output schema with uniqueItems: the
    # check was pairwise (10 s of the worker for 20 KB); now it is one pass.
    "uniqueItems over 1,900 objects": ("unique", guests.writes(UNIQUE_FLOOD), "invalid_output", {}),
}  # fmt: skip


@pytest.fixture(scope="module")
def worker(pool: dict[str, WorkerProcess]) -> WorkerProcess:
    return pool["boundary"]


deployer = deployer_fixture(
    {
        "boundary": {"limits": LIMITS},
        "unique": {"output_schema": {"type": "array", "uniqueItems": True}},
        "test": {},
    },
    settings="settings",
    scope="module",
)


@pytest.fixture(scope="module")
def client(settings: Settings, worker: WorkerProcess, deployer: Registry) -> Iterator[Client]:
    with Client(settings, breaker=NO_BREAKER) as c:
        yield c


def test_hostile_host_calls_get_named_errors_within_their_limits(
    client: Client, deployer: Registry, worker: WorkerProcess, reliability: Recorder
) -> None:
    """Every hostile kind gets its named error (or, for a log flood, its truncated logs) within
    about twice its wall limit, never ok past it; the same worker process serves a good script
    after each; a neighbour shop on the shard is answered correctly all along; the worker's RSS
    comes back within 50 MB."""
    good_shop = shop_on(0, SHARDS, prefix="neighbour")
    deployer.deploy("test", good_shop, guests.ECHO)
    shops = {}
    for index, (kind, (ep, module, _, _)) in enumerate(KINDS.items()):
        shops[kind] = shop_on(0, SHARDS, prefix=f"hostile{index}")
        deployer.deploy(ep, shops[kind], module)
    pid = worker.process.pid
    assert client.run("test", good_shop, {"warm": 1}, timeout=DEADLINE_S).ok
    for kind, (ep, *_) in KINDS.items():  # warm every module (compile, page faults) first
        client.run(ep, shops[kind], {}, timeout=DEADLINE_S)
    rss_before = rss_mb(pid)

    neighbour: dict[str, int] = {"ok": 0, "wrong": 0}
    stop = threading.Event()

    def call_neighbour() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            outcome = client.run("test", good_shop, {"n": n}, timeout=DEADLINE_S)
            neighbour["ok" if outcome.ok and outcome.output == {"n": n} else "wrong"] += 1
            time.sleep(0.005)

    thread = threading.Thread(target=call_neighbour)
    thread.start()
    answered_ms: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        for _ in range(ROUNDS):
            for kind, (ep, _, code, detail) in KINDS.items():
                outcome = client.run(ep, shops[kind], {}, timeout=DEADLINE_S)
                report = outcome.report
                assert report is not None, (kind, outcome)
                assert outcome.error_code == code, (kind, outcome.error)
                assert outcome.error is not None and detail.items() <= outcome.error.detail.items()
                if kind.startswith("stderr: 200"):
                    assert (
                        len(report.logs.encode()) < Limits().log_bytes * 4 and "logs truncated" in report.logs
                    )
                # Never ok past the wall limit; the worker's own run within twice the limit.
                worker_ms = report.instantiate_ms + report.run_ms
                assert not (outcome.ok and worker_ms > WALL_MS), (kind, worker_ms)
                assert worker_ms <= 2 * WALL_MS, (kind, worker_ms)
                assert report.decode_ms <= 2 * WALL_MS, (kind, report.decode_ms)  # output checks too
                answered_ms[kind].append(worker_ms)
                assert pid_of(outcome.worker) == pid
                good = client.run("test", good_shop, {"after": kind}, timeout=DEADLINE_S)
                assert (good.ok, good.output) == (True, {"after": kind}), kind
    finally:
        stop.set()
        thread.join()
    rss_after = rss_mb(pid)
    assert worker.alive and worker.process.pid == pid
    assert neighbour["wrong"] == 0 and neighbour["ok"] > 0
    assert rss_after - rss_before < 50

    reliability(
        12,
        TITLE,
        load=(
            f"one solo worker; each of {len(KINDS)} hostile kinds {ROUNDS} times in turn, a good call after"
            " each, while a neighbour shop on the same shard calls a good script every 5 ms; EP limits:"
            " default but fuel 200,000,000 and memory 64 MiB (wall 100 ms); deadline 5 s"
        ),
        fault=", ".join(KINDS),
        asserted=(
            "each kind gets its named error (EINVAL exits for iovec counts and sums past the caps; the"
            " stderr flood's logs cut at the log limit); never ok past the wall limit; the worker's run"
            " within 2x the wall limit; same worker pid serves a good script after each; every neighbour call"
            " correct; worker RSS growth < 50 MB"
        ),
        figures={
            **{
                f"{kind}: {KINDS[kind][2]}, worker ms (median)": round(statistics.median(ms), 1)
                for kind, ms in answered_ms.items()
            },
            "neighbour calls correct / wrong or fallback": f"{neighbour['ok']} / {neighbour['wrong']}",
            "worker RSS before / after, MiB": f"{rss_before:.0f} / {rss_after:.0f}",
            "worker processes died": 0,
            "what bounds each host call now": (
                f"every call: the run's deadline checked on entry, and again when the guest returns;"
                f" fd_write, fd_read: at most {IOV_MAX:,} iovecs and lengths summing to 2^31 - 1 (else"
                " EINVAL), bytes copied at most the room under the output limit (stdout: none past it,"
                " output_too_large) or the log limit (stderr: the rest counted, truncated);"
                f" random_get: {RANDOM_SLICE_BYTES // 1024} KiB slices with the deadline checked between;"
                " a memory-I/O provider's finalize: output and log lengths checked against the room"
                " before any copy; provider instantiate+initialize and finalize: the script's wall limit"
                " each; every other call: constant work"
            ),
        },
    )
