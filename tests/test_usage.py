"""Usage accounting (issue 25): the stored form and its reader on hostile hash contents, the
recorder's counting, flushing and retries on real Redis, and through real workers: usage totals
equal the reports' instructions and the calls made, they survive a clean restart and a SIGKILL
(after a flush), and ``scriptpool usage`` prints them."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from scriptpool.cli import main
from scriptpool.config import Keys, Settings
from scriptpool.config.errors import ConfigurationError, InvalidArgument
from scriptpool.config.usage import (
    UNKNOWN_APP,
    UsageRow,
    merge_rows,
    parse_since,
    parse_usage_field,
    read_usage,
    usage_field,
)
from scriptpool.config.wire import ErrorInfo, Execution, ExecutionReport, Job, Part
from scriptpool.engine import Sandbox
from scriptpool.producer import Client, Outcome
from scriptpool.registry import Registry
from scriptpool.runtime import Executor
from scriptpool.testing import free_port, make_registry
from scriptpool.workers._usage import UsageRecorder
from tests import guests
from tests.conftest import TEST_ARTIFACT_KEY
from tests.pool import WorkerProcess, shop_on

EP = "metered"
FAILING_EP = "trapping"
METERED = guests.echo(burn=2000)  # a correct script that executes a few thousand instructions
WAIT_S = 15.0  # counts reach Redis within a flush; what this bounds is a test that cannot pass
# A fixed clock for the logic tests (now: counts expire a retention after their minute).
NOW = float(int(time.time()))


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    """Whether ``predicate`` held within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def job(shop: str = "1", ep: str = EP) -> Job:
    """A job as a worker decodes it (its input is not read by the recorder)."""
    return Job("j", ep, shop, b"{}", time.time() + 5, time.time())


# -- the stored form ------------------------------------------------------------------------------


def test_the_field_codec_round_trips_and_refuses_what_it_never_writes() -> None:
    """Fields are ``app|EP|metric``; anything else (another separator count, names no app or EP
    can have, unknown metrics, bytes that are not UTF-8) parses to None."""
    assert parse_usage_field(usage_field("default", EP, "calls")) == ("default", EP, "calls")
    assert parse_usage_field(usage_field(UNKNOWN_APP, EP, "status:refused").encode()) == (
        UNKNOWN_APP,
        EP,
        "status:refused",
    )
    assert parse_usage_field(f"a|{EP}|error:runtime_error") == ("a", EP, "error:runtime_error")
    for hostile in (
        b"a|b",
        b"a|b|calls|x",
        b"A|b|calls",  # upper case: no app name
        b"a|b|cpu",
        b"a|b|status:",
        b"a|b|error:" + b"x" * 100,
        b"a|b|status:OK",
        b"\xff|b|calls",
        b"",
    ):
        assert parse_usage_field(hostile) is None, hostile


def test_since_takes_whole_units_caps_at_the_retention_and_names_bad_text() -> None:
    """``90s``, ``30m``, ``1h``, ``2d``; capped at the retention; anything else is one
    InvalidArgument that says what a period looks like."""
    assert [parse_since(t) for t in ("90s", "30m", "1h", "2d", " 5m ")] == [90, 1800, 3600, 172800, 300]
    assert parse_since("400d", 7 * 86400) == 7 * 86400
    for bad in ("", "1", "h", "0h", "-1h", "1.5h", "1w", "1h30m", "9999999999d"):
        with pytest.raises(InvalidArgument, match="not a period"):
            parse_since(bad)


def test_settings_bound_the_retention_and_the_flush_interval_by_name() -> None:
    """Each out-of-range value is one ConfigurationError naming its variable."""
    assert Settings.from_env({"SCRIPTPOOL_USAGE_FLUSH_S": "0.5"}).usage_flush_s == 0.5
    for name, value in (
        ("SCRIPTPOOL_USAGE_RETENTION_S", "59"),
        ("SCRIPTPOOL_USAGE_RETENTION_S", "99999999999"),
        ("SCRIPTPOOL_USAGE_FLUSH_S", "0.01"),
        ("SCRIPTPOOL_USAGE_FLUSH_S", "nan"),
        ("SCRIPTPOOL_USAGE_FLUSH_S", "61"),
    ):
        with pytest.raises(ConfigurationError, match=name):
            Settings.from_env({name: value})


def test_read_skips_hostile_hash_contents_and_sums_what_it_can_parse(redis_client: redis.Redis) -> None:
    """Counts that are not non-negative integers, fields that are no usage field, set members
    that are no shop id, and keys of the wrong type are skipped; the rest adds up over the
    minutes of the period, filtered by shop, app and EP."""
    keys = Keys("hostile")
    minute = int(NOW) // 60
    good = keys.usage("7", minute)
    redis_client.hset(
        good,
        mapping={
            usage_field("a", EP, "calls"): 2,
            usage_field("a", EP, "instructions"): 100,
            usage_field("a", EP, "status:ok"): 2,
            usage_field("b", EP, "calls"): 1,
            usage_field("a", EP, "bytes_in"): "-5",  # negative
            usage_field("a", EP, "bytes_out"): "1e9",  # not an integer
            usage_field("a", EP, "exec_us"): "9" * 40,  # huge
            "a|metered": 5,  # not a field
            b"\xff\xfe|x|calls": 5,
        },
    )
    redis_client.hset(keys.usage("7", minute - 3), usage_field("a", EP, "calls"), 1)
    redis_client.hset(keys.usage("7", minute - 100), usage_field("a", EP, "calls"), 1000)  # too old
    redis_client.set(keys.usage("8", minute), "a string, not a hash")
    redis_client.sadd(keys.usage_shops(minute), "7", "8", "no:shop", b"\xff")
    redis_client.sadd(keys.usage_shops(minute - 3), "7")
    redis_client.set(keys.usage_shops(minute - 1), "not a set")

    everyone = read_usage(redis_client, keys, since_s=600, now=NOW)
    assert everyone == [
        UsageRow("7", "a", EP, calls=3, by_status={"ok": 2}, instructions=100),
        UsageRow("7", "b", EP, calls=1),
    ]
    assert read_usage(redis_client, keys, shop="7", app="b", since_s=600, now=NOW) == [
        UsageRow("7", "b", EP, 1)
    ]
    assert read_usage(redis_client, keys, shop="7", since_s=60, now=NOW)[0].calls == 2  # this minute only
    assert read_usage(redis_client, keys, ep="other", since_s=600, now=NOW) == []
    assert merge_rows([everyone, everyone])[0].calls == 6


def test_reports_name_the_app_whose_script_made_them(registry: Registry, executor: Executor) -> None:
    """A single script's report names its app; each part of a join names its own, a part that
    failed or was skipped too; the combined report names none, nor does a call with nothing bound."""
    registry.deploy("test", "s", guests.ECHO, app="solo")
    assert executor.execute("test", "s", {}).report.app == "solo"
    assert executor.execute("test", "unbound", {}).report.app == ""
    registry.define_extension_point("multi", combine="join", reducer="concat:discounts")
    registry.deploy("multi", "s", guests.writes(b'{"discounts": []}'), app="a")
    registry.deploy("multi", "s", guests.TRAP, app="b", block_on_failure=True)
    registry.deploy("multi", "s", guests.ECHO, app="c")
    joined = executor.execute("multi", "s", {})
    assert [(p.app, p.status, p.report.app) for p in joined.parts] == [
        ("a", "ok", "a"),
        ("b", "error", "b"),
        ("c", "skipped", "c"),
    ]
    assert joined.report.app == ""


# -- the recorder ----------------------------------------------------------------------------------


class FlakyRedis(redis.Redis):
    """A real Redis client whose first ``failures`` transactions fail as a lost connection."""

    failures = 0

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        if self.failures:
            self.failures -= 1
            raise redis.ConnectionError("connection lost (test)")
        return super().pipeline(transaction, shard_hint)


def test_the_recorder_counts_each_part_under_its_app_and_unrun_jobs_under_star(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """A join counts once per part with the part's own report and status; a single script under
    its report's app ("default" when none); refused and dropped jobs under ``*``. One flush puts
    it all in Redis, with the minute hash and the set of shops expiring."""
    keys = Keys("rec")
    totals: list[tuple[int, int, int, int]] = []
    recorder = UsageRecorder(
        redis.Redis.from_url(redis_url), keys, 3600, 60, count=totals.append, clock=lambda: NOW
    )
    report_a = ExecutionReport(instructions=10, input_bytes=3, output_bytes=4, run_ms=1.5, app="a")
    report_b = ExecutionReport(instructions=5, input_bytes=3, lookup_ms=0.25, app="b")
    joined = Execution(
        False,
        None,
        ErrorInfo("runtime_error", "x"),
        ExecutionReport(instructions=15),
        (
            Part("a", 1, "ok", None, report_a),
            Part("b", 2, "error", ErrorInfo("runtime_error", "trap"), report_b),
            Part("c", 1, "skipped", None, ExecutionReport(app="c")),
        ),
    )
    recorder.record(job(), joined)
    recorder.record(job(), Execution(True, 1, None, ExecutionReport(instructions=7)))
    recorder.record_refused(job(), "quota_exceeded")
    recorder.record_dropped(job())
    recorder.record(job(shop="no:shop"), joined)  # names no key may hold: not counted
    assert recorder.flush() and recorder.pending == 0

    rows = {row.app: row for row in read_usage(redis_client, keys, since_s=60, now=NOW)}
    assert rows["a"] == UsageRow("1", "a", EP, 1, {"ok": 1}, {}, 10, 1500, 3, 4)
    assert rows["b"] == UsageRow("1", "b", EP, 1, {"error": 1}, {"runtime_error": 1}, 5, 250, 3, 0)
    assert rows["c"] == UsageRow("1", "c", EP, 1, {"skipped": 1})
    assert rows["default"] == UsageRow("1", "default", EP, 1, {"ok": 1}, {}, 7)
    assert rows[UNKNOWN_APP] == UsageRow(
        "1", UNKNOWN_APP, EP, 2, {"dropped": 1, "refused": 1}, {"quota_exceeded": 1}
    )
    assert totals == [(15, 1750, 6, 4), (7, 0, 0, 0)]  # what Prometheus adds: the same sums
    minute = int(NOW) // 60
    for key in (keys.usage("1", minute), keys.usage_shops(minute)):
        assert redis_client.expiretime(key) == (minute + 1) * 60 + 3600


def test_a_failed_flush_keeps_the_counts_for_the_next_and_a_bounded_backlog_counts_its_losses(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """Counts survive a flush Redis did not take and arrive, once, with the next; while Redis
    is away at most ``max_pending`` entries wait, and calls past that are counted as lost."""
    keys = Keys("flaky")
    client = FlakyRedis.from_url(redis_url)
    client.failures = 1
    recorder = UsageRecorder(client, keys, 3600, 60, clock=lambda: NOW, max_pending=2)
    ran = Execution(True, 1, None, ExecutionReport(instructions=3, app="a"))
    recorder.record(job("1"), ran)
    assert recorder.flush() is False and recorder.pending == 1
    recorder.record(job("1"), ran)
    assert recorder.flush() is True
    assert read_usage(redis_client, keys, since_s=60, now=NOW) == [
        UsageRow("1", "a", EP, 2, {"ok": 2}, {}, 6)
    ]
    client.failures = 1
    for shop in ("1", "2", "3"):
        recorder.record(job(shop), ran)
    assert recorder.pending == 2 and recorder.lost_calls == 1
    assert recorder.flush() is False and recorder.pending == 2
    assert recorder.flush() is True
    assert sum(row.calls for row in read_usage(redis_client, keys, since_s=60, now=NOW)) == 4


def test_a_key_of_the_wrong_type_fails_only_its_own_commands(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """Someone wrote a string where a minute's hash goes: that shop's counts are refused by
    Redis, every other shop's arrive, and the flush is not retried (retrying would count the
    others twice)."""
    keys = Keys("wrongtype")
    minute = int(NOW) // 60
    redis_client.set(keys.usage("1", minute), "not a hash")
    recorder = UsageRecorder(redis.Redis.from_url(redis_url), keys, 3600, 60, clock=lambda: NOW)
    ran = Execution(True, 1, None, ExecutionReport(app="a"))
    recorder.record(job("1"), ran)
    recorder.record(job("2"), ran)
    assert recorder.flush() is True and recorder.pending == 0
    assert recorder.flush() is True
    assert [row.shop for row in read_usage(redis_client, keys, since_s=60, now=NOW)] == ["2"]
    assert read_usage(redis_client, keys, shop="2", since_s=60, now=NOW)[0].calls == 1


# -- through real workers --------------------------------------------------------------------------


def pool(redis_url: str, prefix: str, flush_s: float) -> Settings:
    """One shard under its own key prefix, with workers that flush every ``flush_s``."""
    return Settings(
        redis_url=redis_url,
        artifact_key=TEST_ARTIFACT_KEY,
        shards=1,
        key_prefix=prefix,
        usage_flush_s=flush_s,
    )


def deploy(settings: Settings, sandbox: Sandbox) -> Registry:
    """The metered echo at EP, and a script that traps at FAILING_EP, for every shop used."""
    registry = make_registry(settings, (EP, FAILING_EP), sandbox=sandbox)
    for shop in SHOPS:
        registry.deploy(EP, shop, METERED)
        registry.deploy(FAILING_EP, shop, guests.TRAP)
    return registry


SHOPS = [shop_on(0, 1, skip=n, prefix="u") for n in range(3)]


def usage_of(settings: Settings, shop: str, ep: str = EP) -> UsageRow | None:
    """The shop's one row at ``ep`` over the last 10 minutes, or None."""
    client = redis.Redis.from_url(settings.redis_url)
    rows = read_usage(client, settings.keys, shop=shop, ep=ep, since_s=600)
    client.close()
    return rows[0] if rows else None


def calls(client: Client, shop: str, count: int, ep: str = EP) -> list[Outcome]:
    """``count`` calls, each answered (ok or a script's error: never a fallback)."""
    outcomes = [client.run(ep, shop, {"n": n}, timeout=10) for n in range(count)]
    assert all(o.status in ("ok", "error") and o.report is not None for o in outcomes), outcomes
    return outcomes


def sample(metrics: str, name: str) -> float:
    """The value of the series ``name`` (with its labels) in Prometheus text."""
    (line,) = [line for line in metrics.splitlines() if line.startswith(name + " ")]
    return float(line.split()[-1])


def instructions(outcomes: list[Outcome]) -> int:
    return sum(o.report.instructions for o in outcomes if o.report is not None)


@pytest.fixture
def stopping() -> Iterator[list[WorkerProcess]]:
    """Workers a test starts, killed after it whatever happened."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()


def test_usage_totals_equal_the_reports_instructions_and_calls_and_the_cli_prints_them(
    redis_url: str,
    redis_client: redis.Redis,
    sandbox: Sandbox,
    stopping: list[WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """N calls: ``usage`` counts N calls, the sum of the reports' instructions and bytes, and
    the failing script's calls by error code; ``scriptpool usage --json`` prints the same, and
    a bad ``--since`` is one line, exit 2."""
    settings = pool(redis_url, "usage-totals", 0.2)
    deploy(settings, sandbox)
    port = free_port()
    stopping.append(WorkerProcess(settings, [0], "ut", {"SCRIPTPOOL_METRICS_PORT": str(port)}).wait_ready())
    shop = SHOPS[0]
    with Client(settings) as client:
        ran = calls(client, shop, 12)
        failed = calls(client, shop, 3, FAILING_EP)
    assert wait_for(lambda: (row := usage_of(settings, shop)) is not None and row.calls == 12)
    row = usage_of(settings, shop)
    assert row is not None and row.app == "default"
    assert row.instructions == instructions(ran) > 0
    assert row.by_status == {"ok": 12} and row.by_error == {}
    assert row.bytes_in == sum(o.report.input_bytes for o in ran if o.report)
    assert row.bytes_out == sum(o.report.output_bytes for o in ran if o.report)
    assert row.exec_us > 0
    assert wait_for(lambda: (f := usage_of(settings, shop, FAILING_EP)) is not None and f.calls == 3)
    failing = usage_of(settings, shop, FAILING_EP)
    assert failing is not None and failing.by_error == {failed[0].error_code: 3}
    # Prometheus has the same totals, and no series per shop.
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert sample(metrics, "scriptpool_instructions_total") == row.instructions + failing.instructions
    assert sample(metrics, 'scriptpool_script_bytes_total{direction="in"}') == row.bytes_in + failing.bytes_in
    assert sample(metrics, "scriptpool_execution_seconds_total") > 0
    assert shop not in metrics

    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", redis_url)
    monkeypatch.setenv("SCRIPTPOOL_KEY_PREFIX", settings.key_prefix)
    monkeypatch.setenv("SCRIPTPOOL_SHARDS", "1")
    capsys.readouterr()
    assert main(["usage", "--shop", shop, "--since", "10m", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["ep"] for r in printed["rows"]] == [EP, FAILING_EP]
    assert printed["rows"][0]["instructions"] == instructions(ran)
    assert printed["total"]["calls"] == 15
    assert printed["total"]["instructions"] == instructions(ran) + instructions(failed)
    assert main(["usage", "--ep", EP]) == 0
    text = capsys.readouterr().out
    assert shop in text and "total: 12 calls (12 ok)" in text
    assert main(["usage", "--since", "yesterday"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scriptpool: invalid_argument: --since 'yesterday'")


def test_usage_survives_a_clean_restart_and_keeps_accumulating(
    redis_url: str, redis_client: redis.Redis, sandbox: Sandbox, stopping: list[WorkerProcess]
) -> None:
    """Workers that would flush only every minute: a clean stop (SIGTERM) sends what they
    counted, and the next worker's counts add to it."""
    settings = pool(redis_url, "usage-restart", 60.0)
    deploy(settings, sandbox)
    shop = SHOPS[1]
    outcomes: list[Outcome] = []
    for round_, count in enumerate((5, 7)):
        worker = WorkerProcess(settings, [0], f"ur{round_}").wait_ready()
        stopping.append(worker)
        with Client(settings) as client:
            outcomes += calls(client, shop, count)
        worker.stop()
        assert worker.process.returncode == 0
        row = usage_of(settings, shop)  # at once: the stop flushed
        assert row is not None and row.calls == len(outcomes)
        assert row.instructions == instructions(outcomes)


def test_a_sigkilled_worker_loses_nothing_it_had_flushed(
    redis_url: str, redis_client: redis.Redis, sandbox: Sandbox, stopping: list[WorkerProcess]
) -> None:
    """Calls, then the counts reach Redis by the periodic flush alone (no stop), then SIGKILL:
    every call and instruction is still counted, once; a new worker adds to them."""
    settings = pool(redis_url, "usage-kill", 0.2)
    deploy(settings, sandbox)
    shop = SHOPS[2]
    worker = WorkerProcess(settings, [0], "uk").wait_ready()
    stopping.append(worker)
    with Client(settings) as client:
        outcomes = calls(client, shop, 10)
    assert wait_for(lambda: (row := usage_of(settings, shop)) is not None and row.calls == 10)
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait(timeout=10)
    row = usage_of(settings, shop)
    assert row is not None and row.calls == 10 and row.instructions == instructions(outcomes)
    stopping.append(WorkerProcess(settings, [0], "uk2").wait_ready())
    with Client(settings) as client:
        outcomes += calls(client, shop, 4)
    assert wait_for(lambda: (row := usage_of(settings, shop)) is not None and row.calls == 14)
    row = usage_of(settings, shop)
    assert row is not None and row.instructions == instructions(outcomes)
