"""Copying one shard's keys from one Redis to another: step 1 of moving a shard (``shard move``)
and the late copy of its step 4 (``shard drain``); the procedure is in ``_shard_commands``.

A copy takes exactly the keys ``Keys.shop_key_patterns`` matches for each shop of the shard
(bindings, their apps' history, rollouts with their candidates' state, the shops' SHOP and
SESSION data with its byte counts, and their quotas), the modules and artifacts those name,
and any extension point, provider or app's APP data the target lacks. It uses DUMP and RESTORE,
so values, list order and expiry (a session's TTL) travel byte for byte. A binding the target
already holds in a newer version (deployed there after the switch) is kept, not overwritten;
copying again is safe.

Data has no version to compare: ``shard move`` (before the switch, while the old group is the
one scripts write to) replaces the target's copy of each data key; the late copy of ``shard
drain`` (after it, when scripts write to the new group) only adds the keys the target lacks.
Neither can copy a shop's data and its byte counter at one instant (scripts write meanwhile), so
each copy then recounts, on the target, every shop of the shard it holds data of
(``recount_shop``: the counter from what the hashes hold, in one Lua script).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from scriptpool.config import Keys, Settings, shard_for
from scriptpool.config.errors import BrokerUnavailable, InvalidArgument, NotReplicated
from scriptpool.config.redis import WriteSession, describe_redis_url, redis_client
from scriptpool.config.store import recount_shop

BATCH = 200  # keys per pipelined round trip
# What a lost or unreachable Redis raises.
TRANSPORT = (redis.ConnectionError, redis.TimeoutError, OSError)


@dataclass
class CopyReport:
    """What one copy moved (counts of keys)."""

    shard: int
    source: str
    target: str
    shops: int = 0
    bindings: int = 0
    histories: int = 0
    unchanged: int = 0  # bindings the target already had, identical
    kept_newer: list[str] = field(default_factory=list)  # bindings newer on the target: kept
    modules: int = 0
    artifacts: int = 0
    extension_points: int = 0
    providers: int = 0
    changed_meanwhile: list[str] = field(default_factory=list)  # deployed on the source during the copy
    data: int = 0  # the shops' SHOP and SESSION data keys (and their byte counts)
    app_data: int = 0  # apps' APP data the target lacked
    quotas: int = 0  # the shops' quotas
    replicas: int = 0


def _shard_of_shop(shop: str, shards: int) -> int | None:
    try:
        return shard_for(shop, shards)
    except InvalidArgument:
        return None  # a key of ours with a shop id we would never have written


def shard_keys(client: redis.Redis, keys: Keys, shard: int, shards: int) -> list[str]:
    """Every key of shard ``shard``'s shops (``Keys.shop_key_patterns``), by SCAN, sorted."""
    found: set[str] = set()
    for pattern in keys.shop_key_patterns():
        for raw in client.scan_iter(match=pattern, count=1000):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            shop = keys.shop_of_key(key)
            if shop is not None and _shard_of_shop(shop, shards) == shard:
                found.add(key)
    return sorted(found)


Binding = dict[str, bytes]  # a binding hash's fields: an app's deployment, "#generation", "#candidate"


def _recency(binding: Binding) -> tuple[int, float]:
    """How recent a binding is: its generation (every change counts one), then when its newest
    app was deployed (two groups may both have changed it if it was deployed on both sides of a
    switch)."""
    deployed = [
        json.loads(raw).get("deployed_at", 0.0) for name, raw in binding.items() if not name.startswith("#")
    ]
    return int(binding.get("#generation", b"0")), max(deployed, default=0.0)


def _modules_named(deployments: Iterable[bytes | str]) -> set[str]:
    """The module hashes a set of deployment records name: their own and their providers'."""
    found: set[str] = set()
    for raw in deployments:
        deployment = json.loads(raw)
        found.add(deployment["sha256"])
        found.update(sha for _, sha in deployment.get("providers") or ())
    return found


def _deployments_in(binding: Binding) -> list[bytes | str]:
    """Every deployment a binding names: each app's, and a rollout candidate's."""
    found: list[bytes | str] = [raw for name, raw in binding.items() if not name.startswith("#")]
    if "#candidate" in binding:
        found.append(json.dumps(json.loads(binding["#candidate"])["deployment"]))
    return found


def _copy(source: redis.Redis, target: redis.Redis, names: list[str], *, replace: bool) -> int:
    """DUMP ``names`` on the source and RESTORE them on the target, in batches; returns how many
    were written (a missing source key, or an existing target key without ``replace``, is not)."""
    written = 0
    for start in range(0, len(names), BATCH):
        batch = names[start : start + BATCH]
        with source.pipeline(transaction=False) as pipe:
            for name in batch:
                pipe.dump(name)
                pipe.pttl(name)
            answers = pipe.execute()
        with target.pipeline(transaction=False) as pipe:
            queued = 0
            for name, dump, ttl in zip(batch, answers[0::2], answers[1::2], strict=True):
                if dump is None or int(ttl) == -2:  # gone (a session expired between the two)
                    continue
                pipe.restore(name, max(int(ttl), 0), dump, replace=replace)
                queued += 1
            results = pipe.execute(raise_on_error=False) if queued else []
        for result in results:
            if isinstance(result, redis.ResponseError):
                if "BUSYKEY" not in str(result):
                    raise result
            else:
                written += 1
    return written


def copy_shard(
    settings: Settings, shard: int, source_url: str, target_url: str, *, late: bool = False
) -> CopyReport:
    """Copy what shard ``shard``'s shops need from one Redis to another (step 1, or with ``late``
    the late copy of step 4 of the procedure), then wait for the target's replicas. A Redis lost
    on the way is one ``BrokerUnavailable`` naming both ends: the copy is safe to run again."""
    try:
        return _copy_shard(settings, shard, source_url, target_url, late=late)
    except TRANSPORT as exc:
        raise BrokerUnavailable(
            f"lost Redis while copying shard {shard} from {describe_redis_url(source_url)} to "
            f"{describe_redis_url(target_url)} ({exc}); run it again: it copies what is missing"
        ) from None


def _copy_shard(
    settings: Settings, shard: int, source_url: str, target_url: str, *, late: bool
) -> CopyReport:
    keys = settings.keys
    report = CopyReport(shard, describe_redis_url(source_url), describe_redis_url(target_url))
    source = redis_client(source_url, timeout=10, connect_timeout=2)
    wait_ms = settings.deploy_wait_ms
    # One connection for every write to the target, so the WAIT at the end covers them all.
    session = WriteSession(target_url, timeout=max(10, wait_ms / 1000 + 1), connect_timeout=2)
    target = session.client
    try:
        names = shard_keys(source, keys, shard, settings.shards)
        report.shops = len({keys.shop_of_key(name) for name in names})
        bindings = [name for name in names if keys.is_binding(name)]
        data = [name for name in names if keys.is_data(name)]
        quotas = [name for name in names if keys.is_quota(name)]
        companions = [
            name
            for name in names
            if not keys.is_binding(name) and not keys.is_data(name) and not keys.is_quota(name)
        ]
        # Which bindings to (re)write: the target lacks them, or holds an older version.
        source_raw = dict(zip(bindings, _values(source, bindings), strict=True))
        target_raw = dict(zip(bindings, _values(target, bindings), strict=True))
        write: list[str] = []
        for name in bindings:
            mine, theirs = source_raw[name], target_raw[name]
            if mine is None:
                continue
            if theirs == mine:
                report.unchanged += 1
            elif theirs is not None and _recency(theirs) > _recency(mine):
                report.kept_newer.append(name)
            else:
                write.append(name)
        # History and rollout state go with their binding (they only ever change together).
        chosen = set(write)
        histories_to_write = sorted(n for n in companions if keys.binding_of_key(n) in chosen)
        history_lists = [n for n in histories_to_write if n.startswith(f"{keys.prefix}:history:")]
        history_values: list[Any] = [v for h in history_lists for v in source.lrange(h, 0, -1)]
        needed = _modules_named(
            [raw for name in write if (binding := source_raw[name]) for raw in _deployments_in(binding)]
        )
        needed |= _modules_named(history_values)
        # What every group holds: extension points and providers the target lacks.
        eps = sorted(_text(n) for n in source.smembers(keys.extension_points()))
        providers = sorted(_text(n) for n in source.smembers(keys.providers()))
        provider_raws = source.mget([keys.provider(n) for n in providers]) if providers else []
        needed |= {json.loads(raw)["sha256"] for raw in provider_raws if raw}
        # Bytes before anything names them, as a deploy writes them: modules, artifacts, then
        # definitions, history, and the bindings last.
        modules = sorted(needed)
        report.modules = _copy(source, target, [keys.module(sha) for sha in modules], replace=False)
        artifact_names = sorted(
            _text(raw)
            for sha in modules
            for raw in source.scan_iter(match=keys.artifacts_pattern(sha), count=1000)
        )
        report.artifacts = _copy(source, target, artifact_names, replace=False)
        report.extension_points = _copy(source, target, [keys.extension_point(n) for n in eps], replace=False)
        report.providers = _copy(source, target, [keys.provider(n) for n in providers], replace=False)
        app_data = sorted(_text(raw) for raw in source.scan_iter(match=keys.data_app_pattern(), count=1000))
        report.app_data = _copy(source, target, app_data, replace=False)
        # Data before the bindings whose scripts read it. Before the switch the source is the
        # group scripts write to (its copy wins); after it, the target is (its keys are kept).
        report.data = _copy(source, target, data, replace=not late)
        recount_data(target, keys, shard, settings.shards, live=late)
        # Quotas as data: before the switch the source's win, after it the target's are kept.
        report.quotas = _copy(source, target, quotas, replace=not late)
        if quotas:
            target.sadd(keys.quota_shops(), *sorted({str(keys.shop_of_key(name)) for name in quotas}))
        if eps:
            target.sadd(keys.extension_points(), *eps)
        if providers:
            target.sadd(keys.providers(), *providers)
        report.histories = _copy(source, target, histories_to_write, replace=True)
        report.bindings = _copy(source, target, write, replace=True)
        # The set of rollouts under way is every shop's: add the moved ones still under way.
        under_way = [
            f"{ep}/{shop}"
            for name in write
            if (binding := source_raw[name]) and "#candidate" in binding
            for ep, shop in [_ep_and_shop(keys, name)]
        ]
        if under_way:
            target.sadd(keys.rollouts_under_way(), *under_way)
        # A deploy that reached the source while we copied: the next copy (or drain) takes it.
        if write:
            again = dict(zip(write, _values(source, write), strict=True))
            report.changed_meanwhile = [name for name in write if again[name] != source_raw[name]]
        replicas = settings.deploy_replicas_for(target_url)
        if replicas:
            report.replicas = session.confirm(replicas, wait_ms)
            if report.replicas < replicas:
                raise NotReplicated(
                    f"shard {shard}'s keys are on the primary of {describe_redis_url(target_url)}, but only "
                    f"{report.replicas} of {replicas} replica(s) acknowledged them within {wait_ms} ms; "
                    "check its replicas, then run `scriptpool shard move` again before switching the map",
                    acknowledged=report.replicas,
                    required=replicas,
                    timeout_ms=wait_ms,
                )
    finally:
        source.close()
        session.close()
    return report


def _data_hashes(
    client: redis.Redis, keys: Keys, shard: int, shards: int
) -> dict[str, tuple[list[str], list[str]]]:
    """Shop -> (its SHOP data hashes, its session hashes), for every shop of shard ``shard`` with
    any data key (bookkeeping included) on ``client``: one SCAN."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    shop_head, session_head = f"{keys.prefix}:data-shop:", f"{keys.prefix}:data-session:"
    for raw in client.scan_iter(match=f"{keys.prefix}:data-*", count=1000):
        name = _text(raw)
        shop = keys.shop_of_key(name)
        if shop is None or not keys.is_data(name) or _shard_of_shop(shop, shards) != shard:
            continue
        shop_hashes, session_hashes = found.setdefault(shop, ([], []))
        if name.startswith(shop_head):
            shop_hashes.append(name)
        elif name.startswith(session_head):
            session_hashes.append(name)
    return found


def recount_data(target: redis.Redis, keys: Keys, shard: int, shards: int, *, live: bool) -> int:
    """Recount, on ``target``, the byte counter of every shop of shard ``shard`` it holds data of
    (returns how many): a copy took the counter and the hashes at different instants, so the
    counter it copied may hold bytes no hash does (locking the shop out) or miss some (letting it
    pass the cap). With ``live`` (scripts write to the target now) a SHOP hash a script created
    after the listing is caught by listing again; a session by the bookkeeping ``recount_shop``
    also reads."""
    found = _data_hashes(target, keys, shard, shards)
    for shop, (shop_hashes, session_hashes) in found.items():
        recount_shop(target, keys, shop, shop_hashes, session_hashes)
    for _ in range(3 if live else 0):
        again = _data_hashes(target, keys, shard, shards)
        grown = [s for s, (hashes, _) in again.items() if not set(hashes) <= set(found.get(s, ([], []))[0])]
        for shop in grown:
            recount_shop(target, keys, shop, *again[shop])
        found = again
        if not grown:
            break
    return len(found)


def _values(client: redis.Redis, names: list[str]) -> list[Binding | None]:
    """The binding hashes ``names``, each as its fields (None: no such binding). A binding from
    before apps (one string) reads as app ``default``."""
    found: list[Binding | None] = []
    for start in range(0, len(names), BATCH):
        batch = names[start : start + BATCH]
        with client.pipeline(transaction=False) as pipe:
            for name in batch:
                pipe.hgetall(name)
            answers = pipe.execute(raise_on_error=False)
        for name, answer in zip(batch, answers, strict=True):
            if isinstance(answer, redis.ResponseError):  # WRONGTYPE: a binding from before apps
                legacy: Any = client.get(name)
                found.append({"default": legacy} if legacy is not None else None)
            else:
                found.append({_text(k): v for k, v in answer.items()} or None)
    return found


def _ep_and_shop(keys: Keys, binding_key: str) -> tuple[str, str]:
    ep, _, shop = binding_key.removeprefix(f"{keys.prefix}:binding:").partition(":")
    return ep, shop


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
