"""How much data a group holds, for ``status``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from scriptpool.config._keys import Keys

# -- sizes, for ``status`` ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataSizes:
    """What one Redis holds of script data: the shops with SHOP or SESSION data and their bytes
    (from their counters), and the apps with APP data and their keys. ``complete`` is False when
    the count stopped at its bound (then the figures are at least these)."""

    shops: int
    shop_bytes: int
    apps: int
    app_keys: int
    complete: bool


def data_sizes(client: redis.Redis, keys: Keys, *, most: int = 10_000) -> DataSizes:
    """Count what ``client``'s Redis holds of script data, reading at most ``most`` counters and
    ``most`` APP hashes (SCAN, so a large keyspace is never blocked on)."""
    complete = True
    counters: list[Any] = []
    for name in client.scan_iter(match=f"{keys.prefix}:data-bytes:*", count=500):
        if len(counters) >= most:
            complete = False
            break
        counters.append(name)
    apps: list[Any] = []
    for name in client.scan_iter(match=keys.data_app_pattern(), count=500):
        if len(apps) >= most:
            complete = False
            break
        apps.append(name)
    shop_bytes = sum(int(v) for v in client.mget(counters) if v is not None) if counters else 0
    app_keys = 0
    if apps:
        with client.pipeline(transaction=False) as pipe:
            for name in apps:
                pipe.hlen(name)
            app_keys = sum(int(n) for n in pipe.execute())
    return DataSizes(len(counters), max(shop_bytes, 0), len(apps), app_keys, complete)
