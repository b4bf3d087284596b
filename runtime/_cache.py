"""A least-recently-used cache bounded in bytes, with hit, miss and eviction counts."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of a cache's counters."""

    entries: int
    bytes: int
    budget_bytes: int
    hits: int
    misses: int
    evictions: int


class ByteLRU(Generic[V]):
    """Keeps the most recently used values whose declared sizes sum to at most ``budget_bytes``."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        """Insert ``value``; one larger than the whole budget is not kept."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.budget_bytes:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.budget_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
                self.evictions += 1

    def discard(self, key: Hashable) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                len(self._items), self._bytes, self.budget_bytes, self.hits, self.misses, self.evictions
            )
