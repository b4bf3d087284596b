"""The pool end to end: real Redis, real Celery worker processes, the host Client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from scriptpool.config import Settings
from scriptpool.config.errors import InputTooLarge, InvalidArgument, InvalidInput, UnknownExtensionPoint
from scriptpool.producer import BreakerPolicy, Client
from scriptpool.registry import Registry
from tests import guests
from tests.conftest import EXAMPLES, TEST_ARTIFACT_KEY, deployer_fixture
from tests.pool import WorkerProcess, pool_fixtures, shop_on

SHARDS = 3  # shard 0: two workers, shard 1: one worker, shard 2: none (a stopped shard)
pool_settings, workers = pool_fixtures(SHARDS, {"w0a": [0], "w0b": [0], "w1": [1]})


deployer = deployer_fixture(("discount", "test"))


@pytest.fixture
def client(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> Iterator[Client]:
    with Client(pool_settings, breaker=BreakerPolicy(error_threshold=3, cooldown_s=0.5)) as c:
        yield c


def test_whole_path_deploy_run_right_shard_hostile_and_stopped_shard(
    client: Client, deployer: Registry
) -> None:
    """Deploy a C discount script, run it from host code on the shop's shard; a hostile script
    yields its named error; a shard with no worker yields the fallback at its deadline."""
    payload = json.loads((EXAMPLES / "discount" / "input.json").read_text())
    expected = json.loads((EXAMPLES / "discount" / "expected_output.json").read_text())
    wasm = (EXAMPLES / "discount" / "discount.wasm").read_bytes()
    for shard in (0, 1):
        shop = shop_on(shard, SHARDS)
        deployer.deploy("discount", shop, wasm)
        outcome = client.run("discount", shop, payload, timeout=5)
        assert outcome.status == "ok", outcome.error
        assert outcome.output == expected
        assert outcome.shard == shard
        assert outcome.worker is not None and outcome.worker.startswith(f"w{shard}")
        assert outcome.report is not None and outcome.report.instructions > 0
        assert outcome.timings.total_ms > 0 and outcome.timings.execute_ms > 0

    hostile = shop_on(1, SHARDS, skip=1)
    deployer.deploy("test", hostile, guests.INFINITE_LOOP)
    outcome = client.run("test", hostile, {}, timeout=5, fallback={"discounts": []})
    assert (outcome.status, outcome.error_code) == ("error", "instruction_limit_exceeded")
    assert outcome.output == {"discounts": []}

    stopped = shop_on(2, SHARDS)
    deployer.deploy("discount", stopped, wasm)
    started = time.perf_counter()
    outcome = client.run("discount", stopped, payload, timeout=0.2, fallback="FALLBACK")
    elapsed = time.perf_counter() - started
    assert (outcome.status, outcome.error_code, outcome.output) == ("fallback", "timeout", "FALLBACK")
    assert 0.2 <= elapsed < 0.2 + 0.005 + 0.02  # deadline + 5 ms, plus scheduling slack


def test_deploy_reaches_every_live_worker_within_100ms(client: Client, deployer: Registry) -> None:
    """After a deploy (and a rollback) every worker on the shard serves the new version."""
    shop = shop_on(0, SHARDS, skip=2)
    deployer.deploy("test", shop, guests.writes(b'{"v":1}'))

    def versions_by_worker() -> dict[str, object]:
        seen: dict[str, object] = {}
        for _ in range(200):
            outcome = client.run("test", shop, {}, timeout=2)
            assert outcome.worker is not None
            seen[outcome.worker.split(":")[0]] = outcome.output
            if len(seen) == 2:
                return seen
        raise AssertionError(f"only saw {seen}")

    assert list(versions_by_worker().values()) == [{"v": 1}, {"v": 1}]
    deployer.deploy("test", shop, guests.writes(b'{"v":2}'))
    time.sleep(0.1)
    assert list(versions_by_worker().values()) == [{"v": 2}, {"v": 2}]
    deployer.rollback("test", shop)
    time.sleep(0.1)
    assert list(versions_by_worker().values()) == [{"v": 1}, {"v": 1}]


def test_stale_job_is_dropped_unexecuted(
    pool_settings: Settings, client: Client, deployer: Registry, redis_client: redis.Redis
) -> None:
    """A job whose caller gave up is dropped by the worker that finally receives it."""
    shop = shop_on(2, SHARDS, skip=1)
    deployer.deploy("test", shop, guests.ECHO)
    outcome = client.run("test", shop, {"late": True}, timeout=0.05)
    assert outcome.error_code == "timeout"
    late_worker = WorkerProcess(pool_settings, [2], "w2").wait_ready()
    try:
        deadline = time.monotonic() + 10
        while "stale_job_dropped" not in late_worker.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = late_worker.log()
        assert "stale_job_dropped" in log
        assert outcome.job_id in log
        executed = [line for line in log.splitlines() if '"event": "execution"' in line]
        assert not any(outcome.job_id in line for line in executed)  # dropped, never run
        # The worker's own counters, from its heartbeat (refreshed every 2 s).
        beat: dict[str, int] = {}
        deadline = time.monotonic() + 6
        while beat.get("dropped_stale") != 1 and time.monotonic() < deadline:
            raw = redis_client.get(pool_settings.keys.worker("w2@test"))
            beat = json.loads(raw) if raw else {}
            time.sleep(0.1)
        assert (beat.get("dropped_stale"), beat.get("executed")) == (1, 0)
    finally:
        late_worker.stop()


def test_breaker_opens_then_probe_closes_it(client: Client, deployer: Registry) -> None:
    """Three failures that say the pool is not answering in time (a script stopped by its wall
    clock; a script's own errors do not count, tests/test_breaker.py) open the (shop, EP)
    breaker; callers then get the fallback with nothing enqueued; after the cool-down one probe
    goes through and closes it."""
    deployer.define_extension_point("slow", limits={"fuel": 10**15, "wall_ms": 20})
    shop = shop_on(1, SHARDS, skip=2)
    deployer.deploy("slow", shop, guests.INFINITE_LOOP)
    for _ in range(3):
        assert client.run("slow", shop, {}, timeout=2).error_code == "wall_clock_exceeded"
    assert client.breaker_state(shop, "slow") == "open"
    blocked = client.run("slow", shop, {}, timeout=2, fallback="fb")
    assert (blocked.status, blocked.error_code, blocked.output) == ("fallback", "circuit_open", "fb")
    assert blocked.worker is None and blocked.timings.enqueue_ms == 0
    other = shop_on(1, SHARDS, skip=3)
    deployer.deploy("slow", other, guests.ECHO)
    assert client.run("slow", other, {"a": 1}, timeout=2).ok  # breakers are per (shop, EP)

    deployer.deploy("slow", shop, guests.ECHO)
    time.sleep(0.55)
    assert client.breaker_state(shop, "slow") == "half_open"
    probe = client.run("slow", shop, {"b": 2}, timeout=2)
    assert probe.ok and probe.output == {"b": 2}
    assert client.breaker_state(shop, "slow") == "closed"


def test_100_threads_wait_at_once(client: Client, deployer: Registry) -> None:
    """100 threads calling run concurrently each get their own correct result."""
    shops = [shop_on(0, SHARDS, skip=3), shop_on(1, SHARDS, skip=4)]
    for shop in shops:
        deployer.deploy("test", shop, guests.ECHO)
    results: dict[int, object] = {}
    barrier = threading.Barrier(100)

    def call(i: int) -> None:
        barrier.wait()
        results[i] = client.run("test", shops[i % 2], {"i": i}, timeout=10)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i].ok and results[i].output == {"i": i} for i in range(100))  # type: ignore[attr-defined]


def test_100_asyncio_tasks_wait_at_once(client: Client, deployer: Registry) -> None:
    """100 asyncio tasks awaiting run_async concurrently each get their own correct result."""
    shops = [shop_on(0, SHARDS, skip=5), shop_on(1, SHARDS, skip=6)]
    for shop in shops:
        deployer.deploy("test", shop, guests.ECHO)

    async def main() -> list[object]:
        calls = [client.run_async("test", shops[i % 2], {"i": i}, timeout=10) for i in range(100)]
        return await asyncio.gather(*calls)

    outcomes = asyncio.run(main())
    assert [o.output for o in outcomes] == [{"i": i} for i in range(100)]  # type: ignore[attr-defined]


def test_second_worker_on_a_shard_consumes_and_survives_the_other(
    pool_settings: Settings, client: Client, deployer: Registry
) -> None:
    """Two workers on shard 1 both take jobs; after one is SIGKILLed the shard is still served."""
    shop = shop_on(1, SHARDS, skip=7)
    deployer.deploy("test", shop, guests.ECHO)
    extra = WorkerProcess(pool_settings, [1], "w1b").wait_ready()
    try:
        seen = set()
        for i in range(300):
            outcome = client.run("test", shop, {"i": i}, timeout=5)
            assert outcome.ok
            seen.add(outcome.worker.split("@")[0])  # type: ignore[union-attr]
            if seen == {"w1", "w1b"}:
                break
        assert seen == {"w1", "w1b"}
        extra.kill()
        for i in range(20):
            outcome = client.run("test", shop, {"i": i}, timeout=5)
            assert outcome.ok and outcome.worker.startswith("w1@")  # type: ignore[union-attr]
    finally:
        extra.kill()


def test_bad_host_input_fails_before_enqueue(
    client: Client, deployer: Registry, redis_client: redis.Redis, pool_settings: Settings
) -> None:
    """Bad calls raise clear errors and leave nothing in any queue."""
    shop = shop_on(2, SHARDS, skip=2)  # no worker: anything enqueued would stay visible
    deployer.deploy("test", shop, guests.ECHO)
    with pytest.raises(InvalidInput):
        client.run("test", shop, {"x": {1, 2}})
    with pytest.raises(InputTooLarge):
        client.run("test", shop, {"x": "y" * 200_000})
    with pytest.raises(UnknownExtensionPoint):
        client.run("nope", shop, {})
    for bad_shop in ("", "a b", "x" * 1000):
        with pytest.raises(InvalidArgument):
            client.run("test", bad_shop, {})
    for bad_timeout in (0, -1, float("nan")):
        with pytest.raises(InvalidArgument):
            client.run("test", shop, {}, timeout=bad_timeout)
    assert redis_client.llen(pool_settings.keys.queue(2)) == 0


def test_strict_raises_named_errors(client: Client, deployer: Registry) -> None:
    """With strict=True the named error is raised, carrying the outcome."""
    from scriptpool.config.errors import DeadlineExceeded, GuestRuntimeError

    trap_shop, stopped_shop = shop_on(0, SHARDS, skip=6), shop_on(2, SHARDS, skip=3)
    deployer.deploy("test", trap_shop, guests.TRAP)
    deployer.deploy("test", stopped_shop, guests.ECHO)
    with pytest.raises(GuestRuntimeError) as info:
        client.run("test", trap_shop, {}, timeout=5, strict=True)
    assert info.value.detail["trap_code"] == "unreachable"
    with pytest.raises(DeadlineExceeded):
        client.run("test", stopped_shop, {}, timeout=0.05, strict=True)


def test_unreachable_redis_gives_fallback_within_deadline(pool_settings: Settings) -> None:
    """With Redis down the caller gets the fallback before its deadline, not after retries."""
    from scriptpool.testing import free_port

    dead = pool_settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with Client(dead) as c:
        started = time.perf_counter()
        outcome = c.run("test", "shop-1", {}, timeout=0.3, fallback="fb")
        elapsed = time.perf_counter() - started
    assert (outcome.status, outcome.error_code, outcome.output) == ("fallback", "broker_unavailable", "fb")
    assert elapsed < 0.3


def test_cli_run_json_prints_the_full_outcome_and_status_shows_the_pool(
    pool_settings: Settings,
    client: Client,
    deployer: Registry,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: object,
) -> None:
    """`scriptpool run --json` prints one JSON object with the report; `status` lists workers."""
    from scriptpool.cli import main

    shop = shop_on(1, SHARDS, skip=8)
    deployer.deploy("discount", shop, (EXAMPLES / "discount" / "discount.wasm").read_bytes())
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", pool_settings.redis_url)
    monkeypatch.setenv("SCRIPTPOOL_ARTIFACT_KEY", TEST_ARTIFACT_KEY.decode())
    monkeypatch.setenv("SCRIPTPOOL_SHARDS", str(SHARDS))
    capsys.readouterr()
    code = main(
        [
            "run",
            "discount",
            shop,
            "--input",
            str(EXAMPLES / "discount" / "input.json"),
            "--timeout-ms",
            "5000",
            "--json",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    assert printed["status"] == "ok" and printed["shard"] == 1
    assert printed["output"]["discounts"][0]["message"] == "10% off 2+ items"
    report = printed["report"]
    assert report["instructions"] > 0 and report["peak_memory_bytes"] > 0 and "qualifying" in report["logs"]
    assert set(printed["timings"]) == {
        "validate_ms",
        "serialize_ms",
        "enqueue_ms",
        "queue_wait_ms",
        "execute_ms",
        "result_ms",
        "total_ms",
    }

    assert main(["run", "discount", shop, "--input", str(EXAMPLES / "discount" / "input.json")]) == 0
    assert "status:  ok" in capsys.readouterr().out

    time.sleep(2.5)  # one heartbeat period
    assert main(["status"]) == 3  # shard 2 has no worker: callers of its shops get fallbacks
    out = capsys.readouterr().out
    assert "live workers 3" in out
    for name in ("w0a@test", "w0b@test", "w1@test"):
        assert name in out
    assert "NONE: callers get fallbacks" in out  # shard 2 has no worker


def test_worker_exports_metrics_and_logs_one_event_per_execution(
    pool_settings: Settings, client: Client, deployer: Registry
) -> None:
    """A worker with a metrics port serves Prometheus counters; its log has one JSON event per run."""
    import urllib.request

    from scriptpool.testing import free_port

    port = free_port()
    extra = WorkerProcess(pool_settings, [2], "w2m", {"SCRIPTPOOL_METRICS_PORT": str(port)}).wait_ready()
    try:
        shop = shop_on(2, SHARDS, skip=4)
        deployer.deploy("test", shop, guests.ECHO)
        bad = shop_on(2, SHARDS, skip=5)
        deployer.deploy("test", bad, guests.TRAP)
        assert client.run("test", shop, {"m": 1}, timeout=5).ok
        assert client.run("test", bad, {}, timeout=5).error_code == "runtime_error"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'scriptpool_executions_total{error_code="",status="ok"} 1.0' in metrics
        assert 'scriptpool_executions_total{error_code="runtime_error",status="error"} 1.0' in metrics
        assert 'scriptpool_stage_seconds_count{stage="run"} 2.0' in metrics
        assert "scriptpool_dropped_stale_jobs_total 0.0" in metrics
        events = [
            json.loads(line[line.index("{") :])
            for line in extra.log().splitlines()
            if '"event": "execution"' in line
        ]
        assert len(events) == 2
        ok = next(e for e in events if e["status"] == "ok")
        for field in (
            "shop",
            "ep",
            "version",
            "shard",
            "worker",
            "error_code",
            "instructions",
            "peak_memory_bytes",
            "lookup_ms",
            "instantiate_ms",
            "run_ms",
            "decode_ms",
        ):
            assert field in ok
        assert ok["shop"] == shop and ok["shard"] == 2
    finally:
        extra.stop()


@pytest.mark.parametrize(
    ("stdout", "code", "output"),
    [
        # What serde_json (function-runner's parser) reads as an f64, and so do we.
        (
            b'{"n":100000000000000000000000000000,"m":-18446744073709551617}',
            None,
            {"n": 1e29, "m": -1.8446744073709552e19},
        ),
        (b'{"n":1e400}', "invalid_output", None),  # past float64: no JSON number holds it
        (b'{"n":' + b"9" * 400 + b"}", "invalid_output", None),
        (b'{"n":NaN}', "invalid_output", None),  # not JSON, though Python's parser takes it
        (b'{"n":-Infinity}', "invalid_output", None),
        (b'{"s":"\\ud800"}', "invalid_output", None),  # a lone surrogate: not text
        (b'{"\\udc00":1}', "invalid_output", None),
        (b'{"s":"\\ud83d\\ude00"}', None, {"s": "\U0001f600"}),  # a pair is a character
    ],
    ids=[
        "wide-ints",
        "exponent-overflow",
        "400-digits",
        "nan",
        "infinity",
        "lone-surrogate",
        "lone-in-key",
        "pair",
    ],
)
def test_numbers_json_cannot_carry_are_named_errors_and_the_worker_carries_on(
    client: Client, deployer: Registry, stdout: bytes, code: str | None, output: object
) -> None:
    """A script printing integers past 64 bits gets them back as floats, as function-runner's
    parser reads them; one printing numbers past float64, NaN, Infinity or a lone surrogate gets
    invalid_output. The reply always arrives, and the same worker runs a good script after."""
    # A shop of its own per case (a worker learns of a redeploy shortly after, not at once), and
    # a good shop beside it on the same shard, served by the shard's one worker.
    shop = shop_on(1, SHARDS, prefix=f"numbers-{hashlib.sha256(stdout).hexdigest()[:12]}")
    good_shop = shop_on(1, SHARDS, prefix="numbers-good")
    deployer.deploy("test", shop, guests.writes(stdout))
    deployer.deploy("test", good_shop, guests.ECHO)
    outcome = client.run("test", shop, {}, timeout=5)
    if code is None:
        assert outcome.status == "ok", outcome.error
        assert outcome.output == output
    else:
        assert outcome.status == "error", (outcome.status, outcome.error)
        assert outcome.error is not None and outcome.error.code == code
    good = client.run("test", good_shop, {"after": 1}, timeout=5)
    assert (good.status, good.output) == ("ok", {"after": 1})
    assert good.worker == outcome.worker
