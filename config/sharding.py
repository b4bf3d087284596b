"""The stable shop-to-shard map: jump consistent hash (Lamping and Veach, 2014).

Growing from N to N+1 shards moves only the shops whose new bucket is the new shard: about
1/(N+1) of them. Every other shop keeps its shard, and so keeps its worker's hot caches.
Shrinking moves only the shops of the removed shard.

Public as ``scriptpool.config.sharding`` for :func:`jump_hash` itself; :func:`shard_for` is also a
name of ``scriptpool.config``, since every side routes shops with it.
"""

from __future__ import annotations

import hashlib

from scriptpool.config._names import check_shop_id

__all__ = ["jump_hash", "shard_for"]

_MASK = (1 << 64) - 1


def jump_hash(key: int, buckets: int) -> int:
    """Map a 64-bit ``key`` to a bucket in ``[0, buckets)``, moving few keys when buckets grow."""
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def shard_for(shop_id: str | int, shards: int) -> int:
    """The shard that serves ``shop_id`` when there are ``shards`` shards."""
    shop = check_shop_id(shop_id)
    # A keyed hash, not Python's hash(): the map must agree across processes and machines.
    key = int.from_bytes(hashlib.blake2b(shop.encode(), digest_size=8).digest(), "little")
    return jump_hash(key, shards)
