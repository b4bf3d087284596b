"""Worker heartbeats: what a live worker publishes about itself, and how anyone reads them.

Workers write one JSON value per worker under ``Keys.worker(name)`` with a TTL; ``status``, the
client's shard-count check and the local pool read them back here.

In the core, not in workers, because the producer reads them (``Client`` names workers started
with another shard count) and the producer may not import workers; the record's writing
(:meth:`WorkerHeartbeat.to_json`) stays beside its reading so the format is spelled once. Public
as ``scriptpool.config.heartbeats``: :class:`WorkerHeartbeat`, :func:`live_workers`,
:func:`shard_count_disagreement`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import redis

from scriptpool.config._keys import Keys

__all__ = ["WorkerHeartbeat", "live_workers", "shard_count_disagreement"]

# SCAN stops after this many heartbeats: a status view, not an inventory.
MAX_WORKERS = 10_000


@dataclass(frozen=True, slots=True)
class WorkerHeartbeat:
    """One live worker as its last heartbeat described it."""

    name: str
    host: str
    pid: int
    shards: tuple[int, ...]
    shard_count: int  # the worker's SCRIPTPOOL_SHARDS
    executed: int = 0
    dropped_stale: int = 0
    cache: dict[str, int] = field(default_factory=dict)
    at: float = 0.0
    # Jobs taken per shard (run or dropped as stale): `shard drain` watches them stop growing.
    shard_jobs: dict[int, int] = field(default_factory=dict)
    # The script data cache's counters: reads served from memory (``hits``) and from Redis
    # (``misses``), in all and per scope (``hits_shop``...), and ``entries`` and ``bytes``.
    store: dict[str, int] = field(default_factory=dict)

    def store_hit_ratio(self) -> float | None:
        """The share of script data reads served from memory, None before any."""
        reads = self.store.get("hits", 0) + self.store.get("misses", 0)
        return self.store.get("hits", 0) / reads if reads else None

    def to_json(self, **extra: Any) -> str:
        """The value stored in Redis; ``extra`` adds fields readers ignore (the claim token)."""
        return json.dumps(
            {
                "name": self.name,
                "host": self.host,
                "pid": self.pid,
                "shards": list(self.shards),
                "shard_count": self.shard_count,
                "executed": self.executed,
                "dropped_stale": self.dropped_stale,
                "cache": self.cache,
                "at": self.at,
                "shard_jobs": {str(k): v for k, v in self.shard_jobs.items()},
                "store": self.store,
                **extra,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkerHeartbeat | None:
        """The heartbeat in ``raw``, or None if it is not one (a foreign or half-written value)."""
        try:
            data: dict[str, Any] = json.loads(raw)
            return cls(
                name=str(data["name"]),
                host=str(data.get("host", "")),
                pid=int(data.get("pid", 0)),
                shards=tuple(int(s) for s in data.get("shards", ())),
                shard_count=int(data.get("shard_count", 0)),
                executed=int(data.get("executed", 0)),
                dropped_stale=int(data.get("dropped_stale", 0)),
                cache={str(k): int(v) for k, v in (data.get("cache") or {}).items()},
                at=float(data.get("at", 0.0)),
                shard_jobs={int(k): int(v) for k, v in (data.get("shard_jobs") or {}).items()},
                store={str(k): int(v) for k, v in (data.get("store") or {}).items()},
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def live_workers(client: redis.Redis, keys: Keys) -> list[WorkerHeartbeat]:
    """Every worker whose heartbeat has not expired, sorted by name (SCAN, never KEYS)."""
    names: list[bytes] = []
    for key in client.scan_iter(match=keys.workers_pattern(), count=500):
        names.append(key)
        if len(names) >= MAX_WORKERS:
            break
    if not names:
        return []
    beats = [WorkerHeartbeat.from_json(raw) for raw in client.mget(names) if raw]
    return sorted((b for b in beats if b is not None), key=lambda b: b.name)


def shard_count_disagreement(beats: list[WorkerHeartbeat], shards: int) -> dict[int, list[str]]:
    """Live workers started with another shard count than ``shards``: count -> worker names."""
    found: dict[int, list[str]] = {}
    for beat in beats:
        if beat.shard_count and beat.shard_count != shards:
            found.setdefault(beat.shard_count, []).append(beat.name)
    return found
