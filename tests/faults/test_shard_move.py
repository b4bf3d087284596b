"""Scenario 10: a shard moves from one group's Redis to another while its shops are being called,
by the documented procedure (shard move, new workers, switch the clients' map, shard drain)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from scriptpool.cli import main
from scriptpool.config import Settings
from scriptpool.producer import Client, Outcome
from scriptpool.registry import Registries
from scriptpool.testing import EmbeddedRedis
from tests import guests
from tests.conftest import TEST_ARTIFACT_KEY
from tests.faults._load import Load, Planned, answered_figures, wrong_results
from tests.faults.conftest import Recorder
from tests.pool import WorkerProcess, shops_on, start_workers

SHARDS = 2
MOVED = 1
JOBS = 3_900
RATE = 300
TIMEOUT_S = 0.5
V1, V2 = guests.writes(b'{"v": 1}'), guests.writes(b'{"v": 2}')


@pytest.fixture(scope="module")
def two_redis() -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis]]:
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        yield a, b


class Switch:
    """What the load calls: one client, then another, as a host restarted with a new map would
    be (in-flight calls finish on the client they started on)."""

    def __init__(self, client: Client) -> None:
        self.current = client

    def run(self, *args: Any, **kwargs: Any) -> Outcome:
        return self.current.run(*args, **kwargs)


def _cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *argv: str
) -> tuple[int, Any]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip().startswith("{") else out


def test_shard_moved_between_groups_under_load(
    two_redis: tuple[EmbeddedRedis, EmbeddedRedis],
    reliability: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every call during the move is answered ok, by the version deployed before it (no fallback,
    no missing script, no older or mixed version); afterwards the new group serves the shard."""
    redis_a, redis_b = two_redis
    old = Settings(artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS, shard_groups=f"0-1={redis_a.url}")
    registries = Registries(old)
    registries.everywhere(lambda r: r.define_extension_point("test"), what="ep test", again="define again")
    moving, staying = shops_on(MOVED, SHARDS, 4), shops_on(0, SHARDS, 2)
    for shop in moving + staying:
        for version in (V1, V2):  # two versions: the history moves too
            with registries.on_shop(shop, what=f"deploy {shop}", again="deploy again") as registry:
                registry.deploy("test", shop, version)
    shops = moving + staying
    plan = [Planned("test", shops[i % len(shops)], {}, {"v": 2}) for i in range(JOBS)]

    workers = start_workers(old, {"m0": [0], "m1old": [MOVED]})
    new_worker: WorkerProcess | None = None
    old_client = Client(old)
    switch = Switch(old_client)
    try:
        load = Load(switch, plan, threads=6, timeout_s=TIMEOUT_S, rate=RATE).start()  # type: ignore[arg-type]
        load.wait_for(JOBS // 5)
        moved_at = time.monotonic()
        code, copied = _cli(
            capsys, monkeypatch, old.to_env(), "shard", "move", str(MOVED), "--to", redis_b.url, "--json"
        )
        assert code == 0, copied
        copy_s = time.monotonic() - moved_at
        new = old.replace(shard_groups=copied["shard_groups"])
        assert new.group_of(MOVED).url == redis_b.url and new.group_of(0).url == redis_a.url
        new_worker = WorkerProcess(new, [MOVED], "m1new").wait_ready()
        new_client = Client(new)
        switch.current = new_client  # every host restarted with the new map
        switched_at = time.monotonic()
        # However far the load got while the new worker started (a busy machine may have let it
        # finish), calls made now go to the new group and its worker.
        switched = [new_client.run("test", shop, {}, timeout=5) for shop in moving for _ in range(3)]
        code, drained = _cli(
            capsys, monkeypatch, new.to_env(), "shard", "drain", str(MOVED), "--from", redis_a.url,
            "--quiet-s", "3", "--json",
        )  # fmt: skip
        assert code == 0, drained
        drained_at = time.monotonic()
        workers[1].stop()  # the old worker of the moved shard, as drain says
        calls = load.join()
        old_client.close()
        # A deploy after the move lands in the new group and is served from there.
        with Registries(new).on_shop(moving[0], what="deploy v1 again", again="again") as registry:
            registry.deploy("test", moving[0], V1)
        # The worker hears of the deploy on the invalidation channel, on its listener's thread: at
        # once on a quiet machine, later on a loaded one, and by the bindings' 5 s TTL at most.
        settle = time.monotonic() + 5.5
        after = new_client.run("test", moving[0], {}, timeout=5)
        while after.output != {"v": 1} and time.monotonic() < settle:
            time.sleep(0.05)
            after = new_client.run("test", moving[0], {}, timeout=5)
        new_client.close()
    finally:
        for worker in [*workers, *([new_worker] if new_worker else [])]:
            worker.stop()

    keys = old.keys
    a, b = redis.Redis.from_url(redis_a.url), redis.Redis.from_url(redis_b.url)
    same = all(
        a.hgetall(keys.binding("test", shop)) == b.hgetall(keys.binding("test", shop))
        and a.lrange(keys.history("test", shop), 0, -1) == b.lrange(keys.history("test", shop), 0, -1)
        for shop in moving[1:]
    )
    staying_on_b = sum(b.exists(keys.binding("test", shop)) for shop in staying)
    moved_calls = [c for c in calls if plan[c.index].shop in moving]
    served_by = Counter(c.worker.split("@")[0] for c in moved_calls if c.worker)
    late_new = [c for c in moved_calls if c.started > switched_at + 0.1]
    versions = Counter(json.dumps(c.output) for c in calls if c.status == "ok")

    assert len(calls) == JOBS and not wrong_results(plan, calls)
    assert all(c.status == "ok" for c in calls), Counter(str(c.error_code) for c in calls if c.status != "ok")
    assert versions == Counter({json.dumps({"v": 2}): JOBS})  # no version older, newer or mixed
    assert all(c.worker and c.worker.startswith("m1new@") for c in late_new)
    assert served_by["m1old"] > 0
    assert all(o.ok and o.output == {"v": 2} and o.worker and o.worker.startswith("m1new@") for o in switched)
    assert (
        copied["bindings"] == len(moving)
        and copied["histories"] == len(moving)
        and copied["extension_points"] == 1
    )
    assert same and staying_on_b == 0  # exactly the moved shard's shops went over
    assert drained["queue_depth"] == 0 and drained["old_workers"] == ["m1old@test"]
    assert after.ok and after.output == {"v": 1} and after.worker and after.worker.startswith("m1new@")

    reliability(
        10,
        "Shard moved to another group under load",
        load=f"{JOBS:,} calls offered at {RATE}/s by 6 caller threads to 4 shops of shard {MOVED} and 2 of "
        f"shard 0, deadline {TIMEOUT_S * 1000:.0f} ms; both shards in group A (one Redis), one solo "
        "worker each; every shop has versions 1 and 2 deployed, 2 active",
        fault=f"during the load: `scriptpool shard move {MOVED} --to <B>`; a worker for shard {MOVED} "
        "started with the new map; the callers switched to a client with the new map; "
        f"`scriptpool shard drain {MOVED} --from <A> --quiet-s 3`; the old shard-{MOVED} worker stopped",
        asserted="every call ok (no fallback, no script_not_found) and answered by version 2 (none "
        "older or mixed); calls after the switch served by the new worker; bindings and history "
        "identical in both Redis, nothing of shard 0 copied; drain finds the old queue empty; a "
        "deploy afterwards lands in group B and is served there",
        figures={
            **answered_figures(calls, JOBS),
            "versions answered": ", ".join(f"{k} {v:,}" for k, v in versions.items()),
            f"shard-{MOVED} calls served by the old / new worker": (
                f"{served_by['m1old']:,} / {served_by['m1new']:,}"
            ),
            "calls right after the switch served by the new worker": f"{len(switched)} of {len(switched)}",
            "keys copied: bindings, histories, modules, artifacts, extension points": (
                f"{copied['bindings']}, {copied['histories']}, {copied['modules']}, {copied['artifacts']}, "
                f"{copied['extension_points']}"
            ),
            "shard move took (s)": round(copy_s, 2),
            "shard drain waited (s)": round(drained_at - switched_at, 1),
        },
    )
