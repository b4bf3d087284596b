"""Scenario 13: compile bombs at deploy and on the job path.

Modules under the size limit made to keep the compiler busy for minutes: at deploy each is
refused with its named error within seconds (a structural cap before anything compiles, or the
compile child's time or memory bound) and nothing is stored or bound; planted in Redis without an
artifact, so that a worker must compile one for a job, the job gets the named error within the
bound and the same worker process serves a good script right after.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from scriptpool.config import Limits, Settings
from scriptpool.config.errors import ModuleTooComplex, ScriptpoolError
from scriptpool.engine import Sandbox
from scriptpool.producer import BreakerPolicy, Client
from scriptpool.registry import Registry
from scriptpool.registry._bounded_compile import Bounds, Compiled, compile_bounded
from tests import guests
from tests.conftest import EXAMPLES, deployer_fixture
from tests.faults.conftest import Recorder
from tests.pool import WorkerProcess, pid_of, pool_fixtures
from tests.test_compile_bombs import (
    MALFORMED,
    NESTED_LOOPS,
    SLOW_UNDER_CAPS,
    STRUCTURAL_BOMBS,
    forbidden_import_last,
    plant,
    script,
    sequential_loops,
)

settings, workers = pool_fixtures(1, {"compile0": [0]}, redis="private_redis", settings="settings")
TITLE = "Compile bombs at deploy and on the job path"


deployer = deployer_fixture(settings="settings", scope="module")


@pytest.fixture(scope="module")
def client(settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry) -> Iterator[Client]:
    with Client(settings, breaker=BreakerPolicy(error_threshold=10**9)) as c:
        yield c


def registry_state(store: redis.Redis, settings: Settings) -> dict[Any, Any]:
    """The registry's keys (modules, artifacts, bindings, histories, definitions) and values;
    the worker's heartbeats and the broker's keys change on their own."""
    prefix = settings.keys.prefix
    kinds = ("module:", "artifact:", "binding:", "history", "ep", "provider", "rollout")
    names = [k.decode() if isinstance(k, bytes) else k for k in store.keys(f"{prefix}:*")]
    return {key: store.dump(key) for key in names if key.split(":", 1)[1].startswith(kinds)}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}"


def _mib(value: Any) -> str:
    return f"{value / 2**20:,.0f}" if isinstance(value, int) else "-"


def _peak(why: str, peak: Any) -> str:
    """The compile child's peak memory: measured at its kill, or none (never compiled)."""
    if why in ("time", "memory"):
        return _mib(peak)
    return "not compiled"


def test_compile_bombs_at_deploy_are_refused_within_seconds_and_store_nothing(
    deployer: Registry,
    client: Client,
    sandbox: Sandbox,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    reliability: Recorder,
) -> None:
    """Every bomb kind is refused at deploy with its named error: the structural ones before
    anything compiles, the slow one at its time bound (within twice it), a compile past its
    memory bound by the kernel; the registry's keys are unchanged by all of them, and a good
    deploy right after is served by the worker."""
    store = redis.Redis.from_url(settings.redis_url)
    deployer.deploy("test", "warm", guests.ECHO)  # the compile server is up, as on a live host
    kinds: dict[str, bytes] = {kind: spec[0] for kind, spec in STRUCTURAL_BOMBS.items()}
    kinds["forbidden-import-last"] = forbidden_import_last()
    kinds["lying-function-count"] = MALFORMED["lying-function-count"]
    kinds["truncated-in-code"] = MALFORMED["truncated-in-code"]
    kinds["slow-under-caps"] = SLOW_UNDER_CAPS
    before = registry_state(store, settings)
    compiles: list[int] = []

    def watched(wasm: bytes, stack_bytes: int, bounds: Bounds | None = None) -> Compiled:
        compiles.append(len(wasm))
        return compile_bounded(wasm, stack_bytes, bounds)

    monkeypatch.setattr("scriptpool.registry._compile.compile_bounded", watched)
    refused: dict[str, tuple[str, str, float, Any]] = {}
    for kind, wasm in kinds.items():
        started = time.perf_counter()
        with pytest.raises(ScriptpoolError) as caught:
            deployer.deploy("test", "bombs", wasm)
        took = time.perf_counter() - started
        error = caught.value
        why = error.detail.get("measure") or error.detail.get("bound") or error.detail.get("name") or ""
        refused[kind] = (error.code, str(why), took, error.detail.get("peak_rss_bytes"))

    memory_bomb = script([sequential_loops(20_000)])
    memory_bounds = Bounds(seconds=60, memory_bytes=384 << 20)
    started = time.perf_counter()
    with pytest.raises(ModuleTooComplex) as caught:
        compile_bounded(memory_bomb, Limits().stack_bytes, memory_bounds)
    refused["memory-bound (384 MiB)"] = ("module_too_complex", "memory", time.perf_counter() - started, None)
    assert caught.value.detail["bound"] == "memory"

    slow_bound = Bounds.for_size(len(SLOW_UNDER_CAPS)).seconds
    for kind, (code, why, _, _) in refused.items():
        expected = "invalid_module" if kind in MALFORMED else "module_too_complex"
        if kind == "forbidden-import-last":
            expected = "forbidden_import"
        assert code == expected, (kind, code, why)
    assert refused["slow-under-caps"][1] == "time" and refused["slow-under-caps"][2] <= 2 * slow_bound
    assert compiles == [len(SLOW_UNDER_CAPS)]  # the others never reached a compiler
    assert registry_state(store, settings) == before

    deployer.deploy("test", "after", guests.ECHO)
    outcome = client.run("test", "after", {"after": 1}, timeout=10)
    assert (outcome.status, outcome.output) == ("ok", {"after": 1}), outcome.error

    # A normal deploy's compile: in process (as before) and in the bounded child.
    discount = (EXAMPLES / "discount" / "discount.wasm").read_bytes()
    stack = Limits().stack_bytes
    in_process, bounded = [], []
    for _ in range(5):
        started = time.perf_counter()
        sandbox.compile(discount, stack)
        in_process.append(time.perf_counter() - started)
        started = time.perf_counter()
        compiled = compile_bounded(discount, stack)
        bounded.append(time.perf_counter() - started)
    reliability(
        13,
        TITLE,
        load="deploys through the registry; a solo worker serving a good script",
        fault=f"{len(kinds)} bomb kinds deployed ({', '.join(kinds)}); a compile past a 384 MiB memory bound",
        asserted=(
            "each refused with its named error (the structural ones before any compile; the slow one at"
            " its time bound, within twice it); registry keys unchanged; a good deploy right after is served"
        ),
        figures={
            **{
                f"{kind}: code, cap or bound, refused in ms, child peak MiB": (
                    f"{code}, {why}, {_ms(took)}, {_peak(why, peak)}"
                )
                for kind, (code, why, took, peak) in refused.items()
            },
            "slow-under-caps time bound, s": f"{slow_bound:.1f}",
            "normal deploy compile (discount.wasm, 49 KB), in process / bounded child, median ms": (
                f"{_ms(statistics.median(in_process))} / {_ms(statistics.median(bounded))}"
            ),
            "bounded child for it: compile s, peak MiB": (
                f"{compiled.seconds:.2f}, {_mib(compiled.peak_rss_bytes)}"
            ),
            "Redis keys changed by the refused deploys": 0,
        },
    )


def test_compile_bombs_on_the_job_path_leave_the_worker_serving(
    deployer: Registry,
    client: Client,
    settings: Settings,
    workers: dict[str, WorkerProcess],
    reliability: Recorder,
) -> None:
    """Bombs planted in Redis without artifacts (as with write access to Redis): the worker that
    must compile them for a job answers module_too_complex (a structural bomb at once, a slow one
    at its time bound), answers the same again at once from its memory of the refusal, and the
    same process serves a good script right after."""
    store = redis.Redis.from_url(settings.redis_url)
    deployer.deploy("test", "good", guests.ECHO)
    first = client.run("test", "good", {"n": 1}, timeout=10)
    assert first.status == "ok", first.error
    pid_before = pid_of(first.worker)
    for shop, wasm in (("planted-nested", NESTED_LOOPS), ("planted-slow", SLOW_UNDER_CAPS)):
        deployer.deploy("test", shop, guests.writes(shop.encode().join([b'"', b'"'])))
        plant(store, settings, shop, wasm)

    answers: dict[str, tuple[str | None, float, Any]] = {}
    for label, shop in (
        ("nested loops (structural)", "planted-nested"),
        ("slow under caps (time bound)", "planted-slow"),
        ("slow under caps, asked again", "planted-slow"),
    ):
        started = time.perf_counter()
        outcome = client.run("test", shop, {}, timeout=30)
        took = time.perf_counter() - started
        assert outcome.status == "error" and outcome.error is not None, outcome
        answers[label] = (outcome.error_code, took, outcome.error.detail)
        assert pid_of(outcome.worker) == pid_before

    bound = Bounds.for_size(len(SLOW_UNDER_CAPS)).seconds
    assert {code for code, _, _ in answers.values()} == {"module_too_complex"}
    assert answers["slow under caps (time bound)"][2]["bound"] == "time"
    assert answers["slow under caps (time bound)"][1] <= 2 * bound
    assert answers["slow under caps, asked again"][2].get("repeated") is True
    after = client.run("test", "good", {"n": 2}, timeout=10)
    assert (after.status, after.output) == ("ok", {"n": 2}), after.error
    pid_after = pid_of(after.worker)
    assert pid_after == pid_before and workers["compile0"].alive

    reliability(
        13,
        TITLE,
        load="a solo worker serving a good script through a Client",
        fault="bombs planted in Redis without artifacts (nested loops, slow under caps), bound to shops",
        asserted=(
            "the job gets module_too_complex (the slow one within twice its time bound), a repeat at once;"
            " the same worker pid serves a good script right after"
        ),
        figures={
            **{
                f"job path, {label}: code, answered in ms": f"{code}, {_ms(took)}"
                for label, (code, took, _) in answers.items()
            },
            "job path child peak MiB (slow bomb, at its kill)": _mib(
                answers["slow under caps (time bound)"][2].get("peak_rss_bytes")
            ),
            "worker pid before / after": f"{pid_before} / {pid_after}",
        },
    )
