"""What a new user met (issue 21, items 4 to 6): a Redis that accepts connections and never
answers, a typo in the Redis URL, values no setting or policy can take, a client given a URL or
used after ``close()``; and an EP record in Redis that cannot be used. Each gets its fallback by
its deadline, or one named error, and the same process serves a good call right after.

Long on purpose: one section per item of issue 21, each test one thing the user met, sharing the
``SilentRedis`` server, the deployed echo and the ``_good_call`` check at the top; the items are
one report and read best as one file."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from scriptpool.cli import main
from scriptpool.config import Settings
from scriptpool.config.errors import ClientClosed, ConfigurationError, InvalidArgument
from scriptpool.config.settings import MAX_SHARDS
from scriptpool.producer import BatchPolicy, BreakerPolicy, Client
from scriptpool.registry import Registry
from tests import guests
from tests.conftest import ROOT, deployer_fixture
from tests.faults._proxy import FaultProxy
from tests.pool import WorkerProcess, pool_fixtures, shop_on

SHARDS = 1
pool_settings, workers = pool_fixtures(SHARDS, {"robust0": [0]})
SHOP = shop_on(0, SHARDS)
# A call must be answered by its deadline plus this (the brief's margin): the old client took
# the socket timeout, 1 s, whatever the deadline.
MARGIN_S = 0.1
# close() gives its reply lists 0.25 s to be deleted (scriptpool.producer._links._CLOSE_S); twice that.
CLOSE_BOUND_S = 0.5
NO_BREAKER = BreakerPolicy(error_threshold=10**9)  # every call tries: none is refused early


class SilentRedis:
    """A TCP server that accepts every connection and never reads or answers: a Redis frozen
    with its port open, or a wrong host that takes connections."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._held: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="silent-redis", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"

    @property
    def connections(self) -> int:
        return len(self._held)

    def _accept(self) -> None:
        while not self._closed:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(connection)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for connection in self._held:
            connection.close()


@pytest.fixture
def silent() -> Iterator[SilentRedis]:
    """A Redis that never answers, for one test."""
    server = SilentRedis()
    yield server
    server.close()


# The pool's registry, with EP ``test`` running ECHO for the test shop.
deployer = deployer_fixture(deploy={("test", SHOP): guests.ECHO})


def _good_call(settings: Settings, note: str) -> None:
    """A good script runs correctly through the pool, from this same process."""
    with Client(settings) as client:
        outcome = client.run("test", SHOP, {"after": note}, timeout=10)
    assert outcome.ok and outcome.output == {"after": note}, outcome


# -- item 4: a Redis that accepts connections and never answers ---------------------------------


def test_calls_to_a_redis_that_never_answers_get_their_fallback_by_their_deadline(
    silent: SilentRedis, pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> None:
    """The first call included (its EP is not cached: the read used to be a synchronous GET that
    waited out the 1 s socket timeout): every call for 1.5 s, through the failed read and after,
    gets its fallback by its 50 ms deadline + 100 ms, never raising. A good call runs after."""
    timeout = 0.05
    late: list[float] = []
    codes: set[str | None] = set()
    with Client(Settings(redis_url=silent.url, shards=SHARDS), breaker=NO_BREAKER) as client:
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            started = time.monotonic()
            outcome = client.run("test", SHOP, {"n": len(late)}, timeout=timeout, fallback={"fb": 1})
            late.append(time.monotonic() - started - timeout)
            assert outcome.status == "fallback" and outcome.output == {"fb": 1}, outcome
            codes.add(outcome.error_code)
    assert silent.connections >= 1  # it was reached, and said nothing
    assert codes == {"broker_unavailable"}, codes
    assert max(late) <= MARGIN_S, [round(x * 1000) for x in late]
    _good_call(pool_settings, "silent redis")


def test_run_async_never_stalls_the_event_loop_on_a_redis_that_never_answers(
    silent: SilentRedis, pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> None:
    """run_async on a cold client (nothing cached) and a silent Redis: a ticker on the same loop
    is never held up for long (it was for the 1 s socket timeout: the EP read ran on the loop),
    and each of 5 concurrent calls gets its fallback by its deadline + 100 ms."""
    timeout = 0.05

    async def scenario(client: Client) -> tuple[float, list[float]]:
        stall = 0.0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal stall
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.monotonic()
                stall = max(stall, now - last - 0.005)
                last = now

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)

        async def one(n: int) -> float:
            started = time.monotonic()
            outcome = await client.run_async("test", SHOP, {"n": n}, timeout=timeout, fallback="fb")
            assert outcome.status == "fallback" and outcome.output == "fb", outcome
            assert outcome.error_code == "broker_unavailable", outcome
            return time.monotonic() - started - timeout

        late = await asyncio.gather(*(one(n) for n in range(5)))
        await asyncio.sleep(0.05)  # the ticker sees any stall the last call caused
        stop.set()
        await ticking
        return stall, list(late)

    with Client(Settings(redis_url=silent.url, shards=SHARDS), breaker=NO_BREAKER) as client:
        stall, late = asyncio.run(scenario(client))
    # The bound is the calls' own: a loop held up by Redis would be held for the socket timeout.
    assert stall <= timeout + MARGIN_S, round(stall * 1000)
    assert max(late) <= MARGIN_S, [round(x * 1000) for x in late]
    _good_call(pool_settings, "async silent redis")


def test_a_group_whose_redis_never_answers_holds_up_no_other_group(
    silent: SilentRedis, pool_settings: Settings, deployer: Registry
) -> None:
    """Shard 0's group never answers and 12 EPs' reads are stuck on it (more than the client has
    publishing threads); shard 1's group is the test Redis: its first call still reads its EP at
    once and publishes (``timeout``: no worker serves shard 1 here), instead of falling back with
    ``broker_unavailable`` because its read queued behind the other group's."""
    settings = pool_settings.replace(shards=2, shard_groups=f"0={silent.url};1={pool_settings.redis_url}")
    on_silent, on_real = shop_on(0, 2), shop_on(1, 2)
    with Client(settings, breaker=NO_BREAKER) as client:
        for n in range(12):
            stuck = client.run(f"ep{n}", on_silent, {}, timeout=0.05)
            assert stuck.error_code == "broker_unavailable", stuck
        answered = client.run("test", on_real, {}, timeout=0.3)
        assert answered.error_code == "timeout", answered
        assert answered.timings.enqueue_ms > 0, answered  # it was published


def test_close_is_prompt_whatever_redis_does(
    silent: SilentRedis,
    redis_url: str,
    pool_settings: Settings,
    workers: dict[str, WorkerProcess],
    deployer: Registry,
) -> None:
    """close() within 0.5 s: on a Redis that never answered (a call still waiting on it), and on
    one that answered and then went silent (black-holed: the reply list cannot be deleted, and
    expires by itself). It took 3 to 4 s: a push to wake the reader, the reader's join and the
    delete each waited out a socket timeout. A second close does nothing."""
    figures: dict[str, float] = {}
    client = Client(Settings(redis_url=silent.url, shards=SHARDS), breaker=NO_BREAKER)
    waiting = threading.Thread(target=client.run, args=("test", SHOP, {}), kwargs={"timeout": 2})
    waiting.start()
    time.sleep(0.1)
    started = time.monotonic()
    client.close()
    figures["never answered"] = time.monotonic() - started
    waiting.join(5)
    assert not waiting.is_alive()

    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = FaultProxy(port)
    try:
        client = Client(pool_settings.replace(redis_url=proxy.url), breaker=NO_BREAKER)
        outcome = client.run("test", SHOP, {"before": "silence"}, timeout=10)
        assert outcome.ok, outcome
        proxy.black_hole()
        started = time.monotonic()
        client.close()
        figures["went silent"] = time.monotonic() - started
        started = time.monotonic()
        client.close()
        figures["closed again"] = time.monotonic() - started
    finally:
        proxy.heal()
        proxy.close()
    assert max(figures.values()) <= CLOSE_BOUND_S, figures
    _good_call(pool_settings, "prompt close")


_TIMED_RUN = """
import atexit, sys, time
from scriptpool.cli import main
import scriptpool.producer, redis  # imported before the clock starts: start-up is not what is timed
started = time.monotonic()
atexit.register(lambda: print(f"TIMED {time.monotonic() - started:.3f}", file=sys.stderr))
sys.exit(main(["run", "test", "shop", "--timeout-ms", "50"]))
"""


def test_scriptpool_run_answers_by_its_deadline_on_a_redis_that_never_answers(silent: SilentRedis) -> None:
    """``scriptpool run --timeout-ms 50`` on a silent Redis: from the command's start (after its
    imports) to the process's exit, its non-daemon threads joined, within the deadline + 0.5 s
    (it took 4.6 s: the limits read, the close and the exit each waited on Redis); one line,
    exit 4 (unreachable)."""
    result = subprocess.run(
        [sys.executable, "-c", _TIMED_RUN],
        env={**os.environ, "SCRIPTPOOL_REDIS_URL": silent.url, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in result.stderr.splitlines() if not line.startswith("TIMED ")]
    timed = float(result.stderr.split("TIMED ")[1].split()[0])
    assert timed <= 0.05 + CLOSE_BOUND_S, timed
    assert result.returncode == 4, result.stderr
    assert len(lines) == 1 and lines[0].startswith("scriptpool: broker_unavailable"), result.stderr
    assert "did not answer" in lines[0], lines


# -- follow-up: an EP record in Redis that cannot be used ----------------------------------------


def test_an_unusable_ep_record_is_an_error_outcome_not_an_exception(
    redis_client: redis.Redis, pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> None:
    """Anyone who can write to Redis can store an EP record no worker can honour (an out-of-range
    limit, a record that is no JSON): run and run_async answer status ``error``, code
    ``configuration_error`` naming the EP, with the fallback as output (run raised it); strict
    raises it. Redefining the EP mends it at once, and the same client serves a good call."""
    hostile = {
        "limit out of range": json.dumps({"name": "broken", "limit_overrides": {"wall_ms": 10**9}}),
        "not JSON": "{not json",
    }
    deployer.define_extension_point("broken")
    deployer.deploy("broken", SHOP, guests.ECHO)
    key = pool_settings.keys.extension_point("broken")
    with Client(pool_settings) as client:
        for case, raw in hostile.items():
            redis_client.set(key, raw)
            outcome = client.run("broken", SHOP, {"x": 1}, timeout=5, fallback="fb")
            assert (outcome.status, outcome.error_code, outcome.output) == (
                "error",
                "configuration_error",
                "fb",
            )
            assert outcome.error is not None and "'broken'" in outcome.error.message, (case, outcome)
            again = asyncio.run(client.run_async("broken", SHOP, {"x": 1}, timeout=5, fallback="fb"))
            assert (again.status, again.error_code) == ("error", "configuration_error"), (case, again)
            with pytest.raises(ConfigurationError, match="broken"):
                client.run("broken", SHOP, {"x": 1}, timeout=5, strict=True)
            good = client.run("test", SHOP, {"case": case}, timeout=10)
            assert good.ok and good.output == {"case": case}, good
        deployer.define_extension_point("broken")
        mended = client.run("broken", SHOP, {"mended": True}, timeout=10)
        assert mended.ok and mended.output == {"mended": True}, mended


# -- item 6: a client used after close(), or given something that is not Settings ----------------


def test_run_after_close_answers_client_closed_at_once(
    pool_settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry
) -> None:
    """A call on a closed client gets its fallback at once with ``client_closed`` (it waited out
    its 5 s deadline); strict raises ClientClosed, and ``limits`` does too. Mistakes in the call
    itself still raise first. A new client serves a good call."""
    client = Client(pool_settings)
    assert client.run("test", SHOP, {"open": True}, timeout=10).ok
    client.close()
    started = time.monotonic()
    outcome = client.run("test", SHOP, {}, timeout=5, fallback="fb")
    assert time.monotonic() - started < 1.0  # 5 s deadline: "at once" with a wide margin
    assert (outcome.status, outcome.error_code, outcome.output) == ("fallback", "client_closed", "fb")
    async_outcome = asyncio.run(client.run_async("test", SHOP, {}, timeout=5, fallback="fb"))
    assert async_outcome.error_code == "client_closed"
    with pytest.raises(ClientClosed):
        client.run("test", SHOP, {}, timeout=5, strict=True)
    with pytest.raises(ClientClosed):
        client.limits("test")
    with pytest.raises(InvalidArgument):
        client.run("test", SHOP, {}, timeout=-1)
    _good_call(pool_settings, "closed client")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("redis://127.0.0.1:6379/0",), "Settings.from_env()"),
        ((None,), "Settings.from_env()"),
        (({"redis_url": "redis://x"},), "Settings(redis_url=...)"),
    ],
    ids=["url", "none", "dict"],
)
def test_a_client_given_no_settings_says_what_to_pass(args: tuple[Any, ...], named: str) -> None:
    """``Client("redis://...")`` raised AttributeError from deep inside; now InvalidArgument
    saying what to pass. A URL alone is refused rather than accepted: the shard count and key
    prefix must be the workers' (SCRIPTPOOL_*), and a URL-only client would silently use the
    defaults and time out on some shops."""
    with pytest.raises(InvalidArgument) as caught:
        Client(*args)
    assert named in caught.value.message
    with pytest.raises(InvalidArgument, match="BreakerPolicy"):
        Client(Settings(), breaker={"error_threshold": 1})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="BatchPolicy"):
        Client(Settings(), batching=4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("error_threshold", 0, "1 or more"),
        ("error_threshold", 2.5, "an integer"),
        ("error_threshold", True, "an integer"),
        ("error_window_s", 0, "(0, 3600]"),
        ("error_window_s", float("nan"), "(0, 3600]"),
        ("error_window_s", float("inf"), "(0, 3600]"),
        ("cooldown_s", -1, "(0, 3600]"),
        ("cooldown_s", "2", "(0, 3600]"),
    ],
)
def test_breaker_policy_refuses_values_out_of_range(field: str, value: object, named: str) -> None:
    """Each field of BreakerPolicy is checked when it is built, by InvalidArgument naming the
    field and its range; the edges and the 'never opens' threshold are accepted."""
    with pytest.raises(InvalidArgument) as caught:
        BreakerPolicy(**{field: value})  # type: ignore[arg-type]
    assert f"BreakerPolicy.{field}" in caught.value.message and named in caught.value.message
    assert caught.value.detail["field"] == field
    BreakerPolicy(error_threshold=1, error_window_s=3600, cooldown_s=0.001)
    BreakerPolicy(error_threshold=10**9)


# -- item 5: an unknown option in the Redis URL ----------------------------------------------


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("rediss://h:6380/0?ssl_ca_cert=/x", "ssl_ca_cert (did you mean ssl_ca_certs?)"),
        (
            "rediss://h:6380/0?ssl_ca_cert=/x",
            "a rediss:// URL takes ssl_ca_certs, ssl_cert_reqs, ssl_certfile",
        ),
        ("redis://h:6379/0?ssl_ca_certs=/x", "the TLS options are for rediss://"),
        ("redis://h:6379/0?socket_timeout=30", "a redis:// URL takes none"),
        ("redis://:pw@h:6379/0?password=pw", "unknown option(s) password"),
        ("unix:///tmp/redis.sock?db=x", "option db must be a database number"),
        ("sentinel://h1,h2/mymaster/0?sentinel_pasword=x", "did you mean sentinel_password?"),
    ],
)
def test_an_unknown_redis_url_option_is_refused_when_the_settings_are_built(url: str, named: str) -> None:
    """redis-py passes any option it does not parse to its connection class as a keyword, so a
    typo failed every command with a TypeError (and Client.run raised it). Now Settings refuses
    it, naming the option, the closest valid one and those the scheme takes; the environment's
    message names the variable, and a shard group's URL is checked the same way."""
    with pytest.raises(ConfigurationError) as caught:
        Settings(redis_url=url)
    assert named in caught.value.message, caught.value.message
    assert "pw" not in caught.value.message.replace("password", "")
    with pytest.raises(ConfigurationError, match="SCRIPTPOOL_REDIS_URL"):
        Settings.from_env({"SCRIPTPOOL_REDIS_URL": url})
    with pytest.raises(ConfigurationError, match="SCRIPTPOOL_SHARD_GROUPS"):
        Settings.from_env({"SCRIPTPOOL_SHARDS": "1", "SCRIPTPOOL_SHARD_GROUPS": f"0={url}"})


def test_the_tls_options_and_a_unix_database_are_still_accepted() -> None:
    """The options redis-py and kombu both read are accepted, as before."""
    query = "ssl_cert_reqs=required&ssl_ca_certs=/ca.crt&ssl_certfile=/c.crt&ssl_keyfile=/c.key"
    assert Settings(redis_url=f"rediss://h:6380/0?{query}").redis_url.endswith(query)
    Settings(redis_url="unix:///tmp/redis.sock?db=3")
    Settings(redis_url="sentinel://h1,h2/mymaster/0?ssl=true&ssl_ca_certs=/ca.crt&sentinel_password=x")


def test_the_cli_refuses_a_url_typo_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``scriptpool run`` with ``?ssl_ca_cert=``: one line naming the option, exit 2, no
    traceback (every command printed a TypeError traceback)."""
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", "rediss://127.0.0.1:6380/0?ssl_ca_cert=/x")
    code = main(["run", "test", "shop"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert "ssl_ca_cert (did you mean ssl_ca_certs?)" in lines[0], lines


# -- item 6: settings with values no process can work with ---------------------------------------


# Each child gets 1 GiB of address space: a list of 10^9 shards (what the unfixed code built)
# fails there with MemoryError instead of taking the machine's memory.
_LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
"""
_HUGE_COUNT = (
    _LIMITED
    + """
from scriptpool.config import Settings
from scriptpool.config.errors import ConfigurationError
try:
    Settings.from_env({"SCRIPTPOOL_SHARDS": "999999999"})
except ConfigurationError as exc:
    print(exc.message)
"""
)
_HUGE_RANGE = (
    _LIMITED
    + """
from scriptpool.config import Settings
from scriptpool.config.errors import ConfigurationError
try:
    Settings(shards=3, shard_groups="0-999999999=redis://a:6379/0")
except ConfigurationError as exc:
    print(exc.message)
"""
)
_HUGE_STATUS = (
    _LIMITED
    + """
from scriptpool.cli import main
sys.exit(main(["status"]))
"""
)


def _child(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_shard_count_has_a_documented_maximum() -> None:
    """SCRIPTPOOL_SHARDS=999999999 made `status` run for minutes (listing a billion shards):
    now it is refused when the settings are built, naming the variable and the maximum (4,096,
    in the README's table), and `status` says so in one line, exit 2. 4,096 itself is accepted
    and a client on it starts."""
    refused = _child(_HUGE_COUNT)
    assert refused.returncode == 0, refused.stderr[-2000:]
    assert "SCRIPTPOOL_SHARDS" in refused.stdout and str(MAX_SHARDS) in refused.stdout, refused.stdout
    status = _child(_HUGE_STATUS, SCRIPTPOOL_SHARDS="999999999")
    lines = status.stderr.strip().splitlines()
    assert status.returncode == 2 and len(lines) == 1 and "4096" in lines[0], status.stderr[-2000:]
    with pytest.raises(ConfigurationError, match="shards"):
        Settings(shards=0)
    readme = (Path(ROOT) / "README.md").read_text()
    assert "| `SCRIPTPOOL_SHARDS` | number of shards, 1 to 4,096;" in readme
    widest = Settings(shards=MAX_SHARDS)
    assert widest.group_of(MAX_SHARDS - 1) == widest.groups[0]
    Client(widest).close()


def test_a_shard_group_range_past_the_shard_count_is_refused_before_it_is_listed() -> None:
    """``SCRIPTPOOL_SHARD_GROUPS=0-999999999=URL`` listed a billion shards before checking them
    against SCRIPTPOOL_SHARDS (out of memory); now the range's end is checked first."""
    result = _child(_HUGE_RANGE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "names shard 999999999, but SCRIPTPOOL_SHARDS=3 means shards 0..2" in result.stdout


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"shards": "4"}, "shards must be an integer, got '4'"),
        ({"shards": True}, "shards must be an integer, got True"),
        ({"default_deadline_ms": 50.5}, "default_deadline_ms must be an integer"),
        ({"default_deadline_ms": 600_001}, "default_deadline_ms must lie in 1..600000"),
        ({"epoch_tick_ms": 5000}, "epoch_tick_ms must lie in 1..1000"),
        ({"join_threads": 1000}, "join_threads must lie in 1..64"),
        ({"input_validation_rate": "often"}, "input_validation_rate must be a number"),
        ({"key_prefix": 7}, "key_prefix must be text"),
        ({"redis_url": b"redis://h/0"}, "redis_url must be text"),
        ({"capture": "no"}, "capture must be True or False"),
        ({"binding_cache_ttl_s": float("inf")}, "binding_cache_ttl_s must be a positive number"),
    ],
)
def test_settings_of_the_wrong_type_or_out_of_range_are_named(changes: dict[str, Any], named: str) -> None:
    """A value from code (not parsed from the environment) of the wrong type failed later, in a
    comparison or at first use, with a TypeError; now ConfigurationError names the field."""
    with pytest.raises(ConfigurationError) as caught:
        Settings(**changes)
    assert named in caught.value.message, caught.value.message


def test_batch_policy_values_are_checked_where_a_client_is_made() -> None:
    """BatchPolicy refuses what made every call time out (window=-1) or fail at call time
    (window="x"), before any client uses it (tests/test_batching.py has the full ranges)."""
    for bad in ({"window": -1}, {"window": "x"}, {"max_jobs": 0}):
        with pytest.raises(InvalidArgument, match="BatchPolicy"):
            BatchPolicy(**bad)
