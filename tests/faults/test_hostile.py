"""Scenario 4: every kind of hostile script, mixed with good traffic, through real workers."""

from __future__ import annotations

import random
import struct
import time
from collections import Counter

import pytest

from scriptpool.config import Limits, Settings
from scriptpool.config.errors import InputTooLarge, ScriptNotFound, ScriptpoolError
from scriptpool.engine import FIXED_TIME_NS
from scriptpool.engine._guest_io import TRUNCATION_MARKER, GuestIO
from scriptpool.producer import BreakerPolicy, Client
from scriptpool.registry import Registry
from scriptpool.testing import rss_mb
from tests import guests
from tests.conftest import EXAMPLES, deployer_fixture
from tests.faults._load import Load, Planned, wrong_results
from tests.faults.conftest import Recorder
from tests.pool import WorkerProcess, pid_of, pool_fixtures, shop_on

SHARDS = 2
settings, workers = pool_fixtures(
    SHARDS, {"hostile0": [0], "hostile1": [1]}, redis="private_redis", settings="settings"
)
TITLE = "Hostile scripts under concurrent load"
HOSTILE_RUNS = 10_000
GOOD_EVERY = 16  # one good call after every 16 hostile ones
WARMUP_PER_KIND = 10  # per kind and shard, before the RSS baseline

# Small limits keep 10,000 hostile runs fast; every limit path is the same as with the defaults.
# The wall clock is generous instead: these runs are bounded by fuel, and a worker descheduled for
# 100 ms on a busy 2-core CI machine must not turn a planned error into wall_clock_exceeded.
HOSTILE_LIMITS = {
    "fuel": 200_000,
    "memory_bytes": 4 * 2**20,
    "stack_bytes": 128 * 1024,
    "output_bytes": 4096,
    "input_bytes": 4096,
    "wall_ms": 1000,
}
GOOD_LIMITS = {"wall_ms": 1000}  # the good script's EP: defaults but for that generous wall clock
# An endless loop with fuel to spare: the wall clock is what stops it (10 ms each, so fewer runs).
WALL_LIMITS = {**HOSTILE_LIMITS, "fuel": 10**12, "wall_ms": 10}
TYPED_SCHEMA = {"type": "object", "required": ["discounts"]}


def fixed_clock_and_random() -> list[int]:
    """What CLOCK_AND_RANDOM prints when the sandbox gives it the fixed clock and random stream."""
    words = struct.unpack("<4I", GuestIO(b"", 0, 0).random_bytes(16))
    return [FIXED_TIME_NS & 0xFFFFFFFF, FIXED_TIME_NS >> 32, *words]


# Runtime kinds: (EP, module, planned error code or None, expected output when it succeeds, weight).
# The weights draw the slow kinds (10 ms wall-clock loops, 3 to 5 ms provider and C runs) less often.
RUNTIME_KINDS: dict[str, tuple[str, bytes, str | None, object, int]] = {
    "infinite-loop": ("hostile", guests.INFINITE_LOOP, "instruction_limit_exceeded", None, 10),
    "wall-clock-loop": ("hostile-wall", guests.INFINITE_LOOP, "wall_clock_exceeded", None, 1),
    "memory-grow-bomb": ("hostile", guests.MEMORY_BOMB, "memory_limit_exceeded", None, 10),
    "c-malloc-bomb": (
        "hostile", (EXAMPLES / "hostile" / "memory_bomb.wasm").read_bytes(), "memory_limit_exceeded", None, 3,
    ),
    "huge-initial-memory": ("hostile", guests.HUGE_INITIAL_MEMORY, "memory_limit_exceeded", None, 10),
    "deep-recursion": ("hostile", guests.RECURSION, "stack_overflow", None, 10),
    "output-flood": ("hostile", guests.OUTPUT_FLOOD, "output_too_large", None, 10),
    "log-flood": ("hostile", guests.LOG_FLOOD, None, {}, 3),  # truncated with a marker, not failed
    "trap": ("hostile", guests.TRAP, "runtime_error", None, 10),
    "trap-in-start": ("hostile", guests.START_TRAP, "runtime_error", None, 10),
    "out-of-bounds": ("hostile", guests.OUT_OF_BOUNDS, "runtime_error", None, 10),
    "non-zero-exit": ("hostile", guests.NONZERO_EXIT, "runtime_error", None, 10),
    "invalid-json": ("hostile", guests.INVALID_JSON, "invalid_output", None, 10),
    "non-utf8": ("hostile", guests.NON_UTF8, "invalid_output", None, 10),
    "schema-violation": ("hostile-typed", guests.writes(b'{"other":1}'), "invalid_output", None, 10),
    "provider-trap": ("hostile", b"", "runtime_error", None, 3),  # module built once the provider exists
    "clock-and-random": ("hostile", guests.CLOCK_AND_RANDOM, None, fixed_clock_and_random(), 10),
}  # fmt: skip
# Deploy-time kinds: refused at deploy with their named error, so they never reach a worker.
DEPLOY_KINDS = {
    "forbidden-import": (guests.FORBIDDEN_ENV_IMPORT, "forbidden_import"),
    "wrong-signature-import": (guests.WRONG_SIGNATURE_IMPORT, "forbidden_import"),
    "socket-import": (guests.SOCKET_OPEN_IMPORT, "forbidden_import"),
    "invalid-module-bytes": (guests.TRUNCATED_MODULE, "invalid_module"),
    "not-wasm": (guests.NOT_WASM, "invalid_module"),
    "missing-entry": (guests.MISSING_ENTRY, "invalid_module"),
    "oversized-module": (guests.oversized(Limits().module_bytes), "module_too_large"),
}
DEPLOY_ROUNDS = 5


deployer = deployer_fixture(
    {
        "test": {"limits": GOOD_LIMITS},
        "hostile": {"limits": HOSTILE_LIMITS},
        "hostile-wall": {"limits": WALL_LIMITS},
        "hostile-typed": {"limits": HOSTILE_LIMITS, "output_schema": TYPED_SCHEMA},
    },
    settings="settings",
    scope="module",
    providers={"answers_v1": guests.PROVIDER},
)


def test_hostile_kinds_under_load_give_named_errors_and_leave_workers_healthy(
    settings: Settings, workers: dict[str, WorkerProcess], deployer: Registry, reliability: Recorder
) -> None:
    """10,000 runs of 17 hostile kinds, mixed with good calls from 8 threads through two solo
    workers: each hostile run gets its planned named error (or, for the log flood and the clock
    reader, its exact output), good calls stay correct, deploy-time kinds are refused at deploy
    and oversized input by the client while the load runs, no worker dies or restarts, each
    still runs a good script right after, and worker RSS grows by less than 50 MB."""
    modules = {kind: spec[1] for kind, spec in RUNTIME_KINDS.items()}
    modules["provider-trap"] = guests.provider_user("answers_v1", "boom")
    shops = {
        (kind, shard): shop_on(shard, SHARDS, prefix=kind)
        for kind in RUNTIME_KINDS
        for shard in range(SHARDS)
    }
    for (kind, _), shop in shops.items():
        deployer.deploy(RUNTIME_KINDS[kind][0], shop, modules[kind])
    good_shops = [shop_on(shard, SHARDS, prefix="good") for shard in range(SHARDS)]
    for shop in good_shops:
        deployer.deploy("test", shop, guests.ECHO)

    def hostile(kind: str, shard: int) -> Planned:
        ep, _, code, expected, _ = RUNTIME_KINDS[kind]
        return Planned(ep, shops[(kind, shard)], {}, expected=expected, error_code=code)

    rng = random.Random(5)
    kinds = list(RUNTIME_KINDS)
    weights = [spec[4] for spec in RUNTIME_KINDS.values()]
    warmup = [
        hostile(kind, shard) for kind in kinds for shard in range(SHARDS) for _ in range(WARMUP_PER_KIND)
    ]
    plan: list[Planned] = []
    for i in range(HOSTILE_RUNS):
        plan.append(hostile(rng.choices(kinds, weights)[0], i % SHARDS))
        if i % GOOD_EVERY == 0:
            payload = {"call": i, "cart": {"lines": [{"qty": i % 7}]}}
            plan.append(Planned("test", good_shops[i % SHARDS], payload, expected=payload))
    pids = {worker.name: worker.process.pid for worker in workers.values()}
    # Never open a breaker: every hostile call must reach a worker.
    with Client(settings, breaker=BreakerPolicy(error_threshold=10**9)) as client:
        warm = Load(client, warmup, threads=8, timeout_s=10).start()
        assert wrong_results(warmup, warm.join()) == []
        rss_before = {name: rss_mb(pid) for name, pid in pids.items()}

        load = Load(client, plan, threads=8, timeout_s=10)
        started = time.monotonic()
        load.start()
        load.wait_for(500)
        done_before_deploys = load.done
        refused: Counter[str] = Counter()
        for _ in range(DEPLOY_ROUNDS):
            for kind, (module, code) in DEPLOY_KINDS.items():
                with pytest.raises(ScriptpoolError) as info:
                    deployer.deploy("hostile", shop_on(0, SHARDS, prefix=kind), module)
                assert info.value.code == code, (kind, info.value)
                refused[kind] += 1
            with pytest.raises(InputTooLarge) as too_big:
                client.run("hostile", shops[("trap", 0)], {"blob": "x" * HOSTILE_LIMITS["input_bytes"]})
            assert too_big.value.code == "input_too_large"
            refused["oversized-input"] += 1
            load.wait_for(load.done + 100)  # spread the rounds over the load
        done_after_deploys = load.done
        calls = load.join(timeout_s=180)
        elapsed = time.monotonic() - started
        rss_after = {name: rss_mb(pid) for name, pid in pids.items()}

        # The same processes, alive, and each runs a good script correctly right away.
        assert all(worker.alive for worker in workers.values())
        after = {}
        for shard, shop in enumerate(good_shops):
            outcome = client.run("test", shop, {"after": shard}, timeout=10)
            assert (outcome.status, outcome.output) == ("ok", {"after": shard}), outcome.error
            after[shard] = pid_of(outcome.worker)
        # The structured detail survives the trip too, and the log flood was cut at the limit.
        details = {}
        for kind, key in (
            ("trap", "trap_code"),
            ("out-of-bounds", "trap_code"),
            ("non-zero-exit", "exit_code"),
        ):
            outcome = client.run(RUNTIME_KINDS[kind][0], shops[(kind, 1)], {}, timeout=10)
            assert outcome.error is not None
            details[kind] = outcome.error.detail[key]
        flood = client.run("hostile", shops[("log-flood", 0)], {}, timeout=10)
        assert flood.ok and flood.report is not None
        kept_logs = flood.report.logs

    assert done_before_deploys < done_after_deploys < len(plan)  # the deploys overlapped the load
    for kind in DEPLOY_KINDS:
        with pytest.raises(ScriptNotFound):
            deployer.binding("hostile", shop_on(0, SHARDS, prefix=kind))
    assert wrong_results(plan, calls) == []
    fallbacks = [c for c in calls if c.status == "fallback"]
    assert fallbacks == []  # every call was answered by a worker, none timed out
    hostile_calls = [c for p, c in zip(plan, calls, strict=True) if p.ep != "test"]
    good_calls = [c for p, c in zip(plan, calls, strict=True) if p.ep == "test"]
    assert len(hostile_calls) == HOSTILE_RUNS
    assert all(c.status == "ok" for c in good_calls)
    seen_pids = {pid_of(c.worker) for c in calls}
    assert seen_pids == set(pids.values()) == set(after.values())  # nobody died and was replaced
    assert details == {"trap": "unreachable", "out-of-bounds": "memory_out_of_bounds", "non-zero-exit": 3}
    log_limit = Limits().log_bytes  # LOG_FLOOD writes 100 KiB of zero bytes to stderr
    assert kept_logs == "\0" * log_limit + TRUNCATION_MARKER.format(dropped=100 * 1024 - log_limit)
    growth = {name: rss_after[name] - rss_before[name] for name in pids}
    assert max(growth.values()) < 50, f"worker RSS grew: {growth}"

    slowest = max(c.elapsed_ms for c in calls)
    by_code = Counter(c.error_code or "ok" for c in hostile_calls)
    mib = 2**20
    reliability(
        4,
        TITLE,
        load=(
            f"{len(plan):,} calls from 8 threads (one good ECHO call per {GOOD_EVERY} hostile runs) through"
            f" 2 shards with one solo worker each; the hostile EPs override the limits to fuel"
            f" {HOSTILE_LIMITS['fuel']:,}, memory {HOSTILE_LIMITS['memory_bytes'] // mib} MiB, stack"
            f" {HOSTILE_LIMITS['stack_bytes'] // 1024} KiB, output/input {HOSTILE_LIMITS['output_bytes']} B"
            f" to keep 10,000 runs fast, wall {HOSTILE_LIMITS['wall_ms']} ms on every EP (wall-clock kind:"
            f" fuel {WALL_LIMITS['fuel']:.0e}, wall {WALL_LIMITS['wall_ms']} ms); breaker off"
        ),
        fault=(
            f"{len(RUNTIME_KINDS)} runtime kinds ({', '.join(RUNTIME_KINDS)}), {len(DEPLOY_KINDS)}"
            f" deploy-time kinds ({', '.join(DEPLOY_KINDS)}) and oversized input, the last two repeated"
            " while the load runs"
        ),
        asserted=(
            "every hostile run gets its named error code (log flood and clock reader: exact output);"
            " good calls correct; deploy-time kinds refused at deploy and nothing bound; oversized input"
            " refused by the client; no fallback; same worker pids before and after, each then runs a good"
            " script; worker RSS growth < 50 MB"
        ),
        figures={
            "hostile runs answered": f"{len(hostile_calls):,} of {HOSTILE_RUNS:,}",
            "hostile kinds": len(RUNTIME_KINDS) + len(DEPLOY_KINDS) + 1,
            "hostile outcomes": ", ".join(f"{code} {n:,}" for code, n in sorted(by_code.items())),
            "good calls correct": f"{sum(c.status == 'ok' for c in good_calls):,} of {len(good_calls):,}",
            "wrong results": len(wrong_results(plan, calls)),
            "fallbacks": len(fallbacks),
            "refusals during load (deploy-time kinds, oversized input)": (
                f"{sum(refused.values()) - refused['oversized-input']} + {refused['oversized-input']}"
            ),
            "worker crashes/restarts": len(seen_pids - set(pids.values())),
            "worker RSS growth, MiB": " / ".join(f"{g:+.1f}" for g in growth.values()),
            "worker RSS after, MiB": " / ".join(f"{rss_after[name]:.0f}" for name in pids),
            "slowest answer, ms (deadline 10,000)": round(slowest, 1),
            "load duration, s": round(elapsed, 1),
            "calls per second": round(len(calls) / elapsed),
        },
    )
