"""Captured runs against real workers: a failing script in the pool is captured and replays
identically, a fixed module passes on the captured input, sampling at 0 keeps no successful
run, the caps evict the oldest, the TTL removes everything, a worker killed mid-capture leaves
no broken record, and readers skip what they cannot read.

Long on purpose: one test per promise of the capture store, all through the three workers (capture
on, a one-second TTL, capture off) the module starts once at the top; split files would each
start their own."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis

from scriptpool.cli import main
from scriptpool.config import Settings
from scriptpool.config.errors import GuestRuntimeError, InstructionLimitExceeded, InvalidArgument, RunNotFound
from scriptpool.engine import Sandbox
from scriptpool.producer import BreakerPolicy, Client
from scriptpool.registry import Registry
from scriptpool.runtime import CaptureStore, recorded_output
from tests import guests
from tests.conftest import EXAMPLES, TEST_ARTIFACT_KEY, deployer_fixture
from tests.faults._proxy import FORWARD, HALF_THEN_CUT, FaultProxy
from tests.pool import WorkerProcess, shops_on, start_workers

OK, FAILED = 0, 1
BUGGY = (EXAMPLES / "replay" / "bulk_discount.wasm").read_bytes()
FIXED = EXAMPLES / "replay" / "bulk_discount_fixed.wasm"
SMALL_CART = json.loads((EXAMPLES / "replay" / "small_cart.json").read_text())  # no bulk line: traps
BULK_CART = json.loads((EXAMPLES / "replay" / "input.json").read_text())
PER_SHOP = 4
MAX_BYTES = 40 * 1024
SHOPS = shops_on(0, 1, 40, prefix="cap")


@pytest.fixture(scope="module")
def settings(redis_url: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        artifact_key=TEST_ARTIFACT_KEY,
        shards=1,
        capture_per_shop=PER_SHOP,
        capture_max_bytes=MAX_BYTES,
    )


@pytest.fixture(scope="module")
def ttl_settings(settings: Settings) -> Settings:
    """A deployment of its own (key prefix) whose captured runs live one second."""
    return settings.replace(key_prefix="ttl", capture_ttl_s=1)


@pytest.fixture(scope="module")
def off_settings(settings: Settings) -> Settings:
    """A deployment of its own with capture switched off (SCRIPTPOOL_CAPTURE=0)."""
    return settings.replace(key_prefix="off", capture=False)


@pytest.fixture(scope="module")
def workers(
    settings: Settings, ttl_settings: Settings, off_settings: Settings
) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        for each, name in ((settings, "cap"), (ttl_settings, "ttl"), (off_settings, "off")):
            started += start_workers(each, {name: [0]})
        yield started
    finally:
        for worker in started:
            worker.stop()


deployer = deployer_fixture(["discount"], settings="settings", after=("workers",))


@pytest.fixture
def store(redis_client: redis.Redis, settings: Settings) -> CaptureStore:
    return CaptureStore(redis_client, settings)


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Any]:
    """``scriptpool ARGV`` in process, with the module's settings: (exit code, stdout, stderr)."""
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def client_of(settings: Settings) -> Client:
    """A client whose breaker never opens: these tests fail scripts on purpose, again and again."""
    return Client(settings, breaker=BreakerPolicy(error_threshold=1_000_000))


def inputs_of(store: CaptureStore, **filters: Any) -> list[Any]:
    """The inputs of the runs listed, newest first (a run evicted meanwhile is left out)."""
    found = []
    for summary in store.summaries(limit=100, **filters):
        try:
            found.append(json.loads(store.get(summary.id).input))
        except RunNotFound:
            continue
    return found


def wait_until(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_a_failing_run_is_captured_and_replays_identically(
    deployer: Registry, settings: Settings, store: CaptureStore, cli: Callable[..., Any], tmp_path: Path
) -> None:
    """The bug traps in the pool; ``runs list`` finds it, ``runs show`` shows its input, logs and
    limits, ``replay`` runs the same version in process: same output, error code and
    instruction count. The fix passes on the captured input; deployed, the shop is served."""
    shop = SHOPS[0]
    deployer.deploy("discount", shop, BUGGY)
    with client_of(settings) as client:
        outcome = client.run("discount", shop, SMALL_CART, timeout=5)
        assert outcome.error_code == GuestRuntimeError.code
        assert client.run("discount", shop, BULK_CART, timeout=5).ok  # a success: not captured (rate 0)
    (found,) = wait_until(lambda: store.summaries(ep="discount", shop_id=shop))
    assert (found.status, found.error_code, found.version) == ("error", GuestRuntimeError.code, 1)

    code, out, _ = cli("runs", "list", "discount", shop, "--json")
    (row,) = json.loads(out)["runs"]
    assert code == OK and row["id"] == found.id and row["error_code"] == GuestRuntimeError.code
    code, out, _ = cli("runs", "list", "--status", "error")
    assert code == OK and found.id in out
    code, out, _ = cli("runs", "show", found.id, "--json")
    shown = json.loads(out)
    assert code == OK
    assert shown["input"] == SMALL_CART and shown["limits"]["fuel"] == settings.limits.fuel
    assert shown["report"]["logs"] == "qualifying lines: 0 of 2\n"
    assert shown["error"]["detail"] == {"trap_code": "integer_division_by_zero"}
    assert shown["sha256"] == deployer.binding("discount", shop).sha256
    code, out, _ = cli("runs", "show", found.id)
    assert code == OK and "integer_division_by_zero" in out and f"replay {found.id}" in out

    code, out, _ = cli("replay", found.id, "--json")
    replayed = json.loads(out)
    assert code == FAILED  # the script fails again, as recorded
    assert replayed["identical"] == {"output": True, "error_code": True, "instructions": True, "all": True}
    assert replayed["outcome"]["report"]["instructions"] == outcome.report.instructions  # type: ignore[union-attr]
    assert replayed["outcome"]["error"]["code"] == GuestRuntimeError.code
    code, out, _ = cli("replay", found.id)
    assert "instructions: identical" in out and "error code:   identical" in out

    code, out, _ = cli("replay", found.id, "--module", str(FIXED), "--json")
    fixed = json.loads(out)
    assert code == OK
    assert fixed["outcome"]["status"] == "ok" and fixed["outcome"]["output"]["discounts"] == []
    assert fixed["identical"]["error_code"] is False and fixed["module"] == "file"

    assert cli("deploy", "discount", shop, str(FIXED))[0] == OK
    with client_of(settings) as client:
        assert wait_until(lambda: client.run("discount", shop, SMALL_CART, timeout=5).ok)


def test_sampling_at_zero_keeps_no_success_and_at_one_keeps_every_one(
    deployer: Registry, settings: Settings, store: CaptureStore
) -> None:
    quiet, sampled = SHOPS[1], SHOPS[2]
    deployer.define_extension_point("sampled", capture_rate=1.0)
    deployer.deploy("discount", quiet, guests.ECHO)
    deployer.deploy("sampled", sampled, guests.ECHO)
    with client_of(settings) as client:
        for n in range(3):
            assert client.run("discount", quiet, {"n": n}, timeout=5).ok
            assert client.run("sampled", sampled, {"n": n}, timeout=5).ok
        deployer.deploy("discount", quiet, guests.TRAP)
        time.sleep(0.1)  # the deploy reaches the worker
        assert client.run("discount", quiet, {"fails": True}, timeout=5).error_code == GuestRuntimeError.code
    wait_until(lambda: len(store.summaries(shop_id=sampled)) == 3 and store.summaries(shop_id=quiet))
    time.sleep(0.2)  # nothing else is on its way
    assert [s.status for s in store.summaries(shop_id=quiet)] == ["error"]  # the failure only
    runs = [store.get(s.id) for s in store.summaries(shop_id=sampled)]
    assert sorted(json.loads(r.input)["n"] for r in runs) == [0, 1, 2]
    assert all(r.ok and recorded_output(r) == json.loads(r.input) for r in runs)


def test_caps_evict_the_oldest(deployer: Registry, settings: Settings, store: CaptureStore) -> None:
    """Past the per-shop cap a shop's oldest run goes; past the byte cap the oldest anywhere."""
    busy, *others = SHOPS[3:12]
    deployer.deploy("discount", busy, guests.TRAP)
    with client_of(settings) as client:
        for n in range(PER_SHOP + 3):
            assert client.run("discount", busy, {"n": n}, timeout=5).error_code == GuestRuntimeError.code
        newest = list(reversed(range(3, PER_SHOP + 3)))
        wait_until(lambda: [i["n"] for i in inputs_of(store, shop_id=busy)] == newest)
        # Runs of about 10 KiB each, one per shop: the byte cap (40 KiB) keeps the newest three.
        padding = "x" * 10_000
        for n, shop in enumerate(others):
            deployer.deploy("discount", shop, guests.TRAP)
            assert client.run("discount", shop, {"n": n, "pad": padding}, timeout=5).error_code
            wait_until(lambda shop=shop: store.summaries(shop_id=shop))  # type: ignore[misc]
    kept = [i["n"] for i in inputs_of(store)]
    assert kept == sorted(kept, reverse=True)  # newest first
    assert kept[:3] == [len(others) - 1, len(others) - 2, len(others) - 3]
    assert store.total_bytes() <= MAX_BYTES
    assert not store.summaries(shop_id=busy)  # the oldest runs went first
    assert len(kept) < len(others)


def test_captured_data_disappears_after_the_ttl(
    redis_client: redis.Redis, ttl_settings: Settings, workers: list[WorkerProcess]
) -> None:
    registry = Registry(redis_client, ttl_settings, Sandbox())
    registry.define_extension_point("discount")
    shop = SHOPS[20]
    registry.deploy("discount", shop, guests.TRAP)
    store = CaptureStore(redis_client, ttl_settings)
    with client_of(ttl_settings) as client:
        assert client.run("discount", shop, {"secret": "card 4111"}, timeout=5).error_code
    wait_until(lambda: store.summaries(shop_id=shop))
    keys = lambda: sorted(k.decode() for k in redis_client.scan_iter(match="ttl:run*"))  # noqa: E731
    assert keys()
    time.sleep(1.3)
    assert keys() == []
    assert store.summaries() == []
    assert not any(b"4111" in (redis_client.dump(k) or b"") for k in redis_client.scan_iter(match="ttl:*"))


def test_capture_switched_off_or_off_for_an_ep_keeps_nothing(
    redis_client: redis.Redis,
    off_settings: Settings,
    settings: Settings,
    deployer: Registry,
    store: CaptureStore,
) -> None:
    off = Registry(redis_client, off_settings, Sandbox())
    off.define_extension_point("discount")
    shop, private = SHOPS[21], SHOPS[22]
    off.deploy("discount", shop, guests.TRAP)
    deployer.define_extension_point("private", capture=False)
    deployer.deploy("private", private, guests.TRAP)
    with client_of(off_settings) as client:
        assert client.run("discount", shop, {}, timeout=5).error_code == GuestRuntimeError.code
    with client_of(settings) as client:
        assert client.run("private", private, {}, timeout=5).error_code == GuestRuntimeError.code
    time.sleep(0.3)
    assert not list(redis_client.scan_iter(match="off:run*"))
    assert store.summaries(shop_id=private) == []


def test_a_worker_killed_mid_capture_leaves_no_broken_record(
    redis_url: str,
    redis_client: redis.Redis,
    settings: Settings,
    workers: list[WorkerProcess],
    cli: Callable[..., Any],
) -> None:
    """The worker talks to Redis through a proxy that SIGKILLs it when its capture write goes
    out and lets only half of that command through: no record, summary or index entry is left;
    the next worker captures the same failure whole, and it replays."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    victim: list[int] = []

    def inspect(_number: int, command: bytes) -> str:
        if b"kill:run:" in command and victim:
            os.killpg(victim[0], signal.SIGKILL)
            return HALF_THEN_CUT
        return FORWARD

    proxy = FaultProxy(port, inspect=inspect)
    through = settings.replace(key_prefix="kill", redis_url=proxy.url)
    direct = settings.replace(key_prefix="kill")
    registry = Registry(redis_client, direct, Sandbox())
    registry.define_extension_point("discount")
    shop = SHOPS[23]
    registry.deploy("discount", shop, guests.TRAP)
    store = CaptureStore(redis_client, direct)
    worker = WorkerProcess(through, [0], "doomed").wait_ready()
    try:
        victim.append(worker.process.pid)
        with client_of(direct) as client:
            outcome = client.run("discount", shop, {"first": True}, timeout=5)
            assert outcome.error_code == GuestRuntimeError.code  # the reply went out before the capture
            wait_until(lambda: not worker.alive)
    finally:
        worker.kill()
        proxy.close()
    assert list(redis_client.scan_iter(match="kill:run*")) == []  # nothing: no record, no index
    assert store.summaries() == [] and store.total_bytes() == 0

    healthy = WorkerProcess(direct, [0], "healthy").wait_ready()
    try:
        with client_of(direct) as client:
            assert client.run("discount", shop, {"second": True}, timeout=5).error_code
        (found,) = wait_until(lambda: store.summaries(shop_id=shop))
        assert json.loads(store.get(found.id).input) == {"second": True}
    finally:
        healthy.stop()


def test_readers_skip_what_they_cannot_read(
    redis_client: redis.Redis, settings: Settings, store: CaptureStore, cli: Callable[..., Any]
) -> None:
    keys = settings.keys
    bad = "0123456789abcdef"
    redis_client.set(keys.run(bad), b"\x93not a record")
    redis_client.zadd(keys.runs(), {bad: time.time() * 1e6, "feedfacefeedface": 1})
    redis_client.hset(keys.runs_summary(), bad, "{not json")
    assert store.summaries() == []
    code, out, _ = cli("runs", "list", "--json")
    assert code == OK and json.loads(out) == {"runs": []}
    code, _, err = cli("runs", "show", bad)
    assert code == FAILED and err.startswith(f"scriptpool: {RunNotFound.code}: ") and "cannot be read" in err
    code, _, err = cli("runs", "show", "feedfacefeedface")
    assert code == FAILED and "not captured" in err
    code, _, err = cli("replay", "NOT-AN-ID")
    assert err.startswith(f"scriptpool: {InvalidArgument.code}: ")


@pytest.mark.parametrize(
    "summary",
    [
        '{"id":"x","at":1,"ep":"e","shop":"s","app":"a","version":Infinity,"status":"ok",'
        '"instructions":1,"input_bytes":1,"bytes":1,"expires_at":1e300}',
        "[" * 100_000 + "]" * 100_000,
    ],
    ids=["infinite-version", "nested-100000-deep"],
)
def test_a_hostile_summary_is_skipped_and_the_good_runs_listed(
    redis_client: redis.Redis, settings: Settings, store: CaptureStore, summary: str
) -> None:
    """A summary whose numbers cannot be integers (int(inf) is an OverflowError) or that nests
    past the parser is skipped like any unreadable one; it made ``runs list`` exit with a
    traceback and hid the valid runs."""
    keys = settings.keys
    bad = "00000000000000ff"
    redis_client.zadd(keys.runs(), {bad: time.time() * 1e6})
    redis_client.hset(keys.runs_summary(), bad, summary)
    redis_client.set(keys.run(bad), msgpack.packb({"limits": {"fuel": float("inf")}}))
    assert all(s.id != bad for s in store.summaries())
    with pytest.raises(RunNotFound):
        store.get(bad)


def test_scaled_limits_apply_on_the_worker_and_are_captured(
    deployer: Registry, settings: Settings, store: CaptureStore, cli: Callable[..., Any]
) -> None:
    """Through the pool: 400 lines at 0.005 double the budget (about 18M instructions pass), the
    report carries the factor; under a fixed EP the same cart fails, and its capture records the
    limits in force, so it replays the same."""
    big, fixed = SHOPS[24], SHOPS[25]
    deployer.define_extension_point("cart", scale={"cart.lines": 0.005})
    deployer.define_extension_point("fixed")
    script = guests.per_byte_work(40)
    deployer.deploy("cart", big, script)
    deployer.deploy("fixed", fixed, script)
    with client_of(settings) as client:
        scaled = client.run("cart", big, guests.cart(400), timeout=5)
        assert scaled.ok and scaled.report is not None, scaled.error
        assert (scaled.report.scale_factor, scaled.report.instructions > 11_000_000) == (2.0, True)
        small = client.run("cart", big, guests.cart(10), timeout=5)
        assert small.ok and small.report is not None and small.report.scale_factor == 1.0
        failed = client.run("fixed", fixed, guests.cart(400), timeout=5)
        assert failed.error_code == InstructionLimitExceeded.code
    (found,) = wait_until(lambda: store.summaries(shop_id=fixed))
    run = store.get(found.id)
    assert (run.limits["fuel"], run.scale_factor) == (settings.limits.fuel, 1.0)
    code, out, _ = cli("replay", found.id, "--json")
    assert code == FAILED and json.loads(out)["identical"]["all"] is True


def test_each_part_of_a_chain_is_captured_with_its_own_input(
    deployer: Registry, settings: Settings, store: CaptureStore, cli: Callable[..., Any]
) -> None:
    """A chain step that fails is captured with the input it got (the call's input and the
    previous step's output) and replays alone; the steps that succeeded are not captured."""
    shop = SHOPS[26]
    deployer.define_extension_point("pricing", combine="chain")
    deployer.deploy("pricing", shop, (EXAMPLES / "chain" / "step_a.wasm").read_bytes(), app="step-a")
    deployer.deploy("pricing", shop, guests.TRAP, app="step-b")
    with client_of(settings) as client:
        outcome = client.run("pricing", shop, {"base": 1000}, timeout=5)
        assert outcome.ok and [p.status for p in outcome.parts] == ["ok", "error"]
    (found,) = wait_until(lambda: store.summaries(shop_id=shop))
    run = store.get(found.id)
    assert (run.app, run.part) == ("step-b", "chain")
    assert json.loads(run.input) == {"input": {"base": 1000}, "previous": outcome.output}  # step a's
    code, out, _ = cli("replay", found.id, "--json")
    assert code == FAILED and json.loads(out)["identical"]["all"] is True


def test_what_waits_for_the_writer_is_bounded_and_a_run_past_the_byte_cap_is_not_stored(
    redis_client: redis.Redis, registry: Registry, executor: Any, settings: Settings
) -> None:
    """In process: traces past the writer's pending bound are dropped (never blocking the task),
    a run larger than the whole byte cap is not stored, and the next ordinary run is, even after
    Redis forgot the write script."""
    from scriptpool.config.wire import Job
    from scriptpool.runtime import CaptureWriter

    registry.deploy("test", "big", guests.TRAP)
    store = CaptureStore(redis_client, settings)
    writer = CaptureWriter(settings, client=redis_client, max_pending_bytes=1000)
    try:
        huge: list[Any] = []
        executor.execute("test", "big", {"pad": "x" * 5000}, trace=huge)
        job = Job("j1", "test", "big", b"{}", time.time() + 5, time.time())
        writer.offer(job, huge, "w")  # 5 kB > the 1 kB bound: dropped at once
        past_cap: list[Any] = []
        executor.execute("test", "big", {"pad": "x" * (MAX_BYTES + 1000)}, trace=past_cap)
        roomy = CaptureWriter(settings, client=redis_client)
        roomy.offer(job, past_cap, "w")  # queued, then refused by the store: larger than the cap
        small: list[Any] = []
        executor.execute("test", "big", {"small": True}, trace=small)
        redis_client.script_flush()  # a restarted Redis: the writer sends its script again
        roomy.offer(job, small, "w")
        roomy.close()
        (kept,) = store.summaries()
        assert json.loads(store.get(kept.id).input) == {"small": True}
    finally:
        writer.close()


def test_runs_are_deleted_on_request(
    deployer: Registry, settings: Settings, store: CaptureStore, cli: Callable[..., Any]
) -> None:
    shop = SHOPS[27]
    deployer.deploy("discount", shop, guests.TRAP)
    with client_of(settings) as client:
        for n in range(2):
            assert client.run("discount", shop, {"n": n}, timeout=5).error_code
    first, second = wait_until(
        lambda: len(store.summaries(shop_id=shop)) == 2 and store.summaries(shop_id=shop)
    )
    code, out, _ = cli("runs", "delete", first.id, "--json")
    assert (code, json.loads(out)) == (OK, {"deleted": 1})
    assert [s.id for s in store.summaries()] == [second.id]
    code, out, _ = cli("runs", "delete", "--shop", shop)
    assert (code, out.strip()) == (OK, "deleted 1 captured run(s)")
    assert store.summaries() == [] and store.total_bytes() == 0
    assert cli("runs", "delete")[2].startswith(f"scriptpool: {InvalidArgument.code}: ")
    assert cli("runs", "delete", "xyz")[2].startswith(f"scriptpool: {InvalidArgument.code}: ")
