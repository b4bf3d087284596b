"""Script data on the worker: the values a script's input query selects with ``store(scope:,
key:)``, held hot in this process and resolved here, so the host never loads or sends them.

:class:`StoreCache` keeps values as the JSON text a script's input carries (``encode_input``'s
form) in a least-recently-used map bounded by those bytes (:data:`STORE_CACHE_BYTES`). A value
not held is read from the worker's shard group's Redis with one ``HGET`` of its hash
(``Keys.data_app``, ``Keys.data_shop``, ``Keys.data_session``: key -> JSON text), normalised
once and kept; an absent key is kept too (as None), so a query selecting data nobody wrote
costs no read per call. A hot read is spliced into the input's text (:func:`placeholder`,
:func:`splice`), never decoded or encoded per call (scripts/bench_store.py: 4 us for 1 kB, where
the same value sent in the input costs the worker 45 us). What keeps it coherent:

* every write (the host's ``DataStore`` or a script's ``storeWrites``) publishes a data message
  on the invalidation channel; the worker's :class:`~scriptpool.config.redis.InvalidationListener`
  hands it to :meth:`StoreCache.invalidate`, which drops the entries it names;
* on every (re)subscription the listener forgets everything (``Executor.invalidate()``, which
  calls ``invalidate(None)``), as messages may have been missed meanwhile; nothing read while
  it is not subscribed is kept (``coherent``); what a worker's own job wrote is dropped at once
  (:meth:`StoreCache.forget_written`);
* a read that an invalidation of the same entry overtook is used once and not kept (a token per
  read in flight), so a value read before a write can never be held after it;
* every entry expires after ``backstop_s`` (the binding cache's TTL: the same backstop for an
  invalidation missed while the subscription stayed up);
* a SESSION value is read with its hash's ``PTTL`` and is never served past it: sessions expire
  in Redis by themselves, without a message.

Reads are counted per scope (:meth:`StoreCache.stats`): the worker's metrics and heartbeat show
the hit ratios. Nothing here imports Celery, kombu or a metrics library (the runtime's contract).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scriptpool.config import Keys, get_logger
from scriptpool.config.errors import WorkerFailed
from scriptpool.config.store import APP, SCOPES, SESSION, SHOP, decode_value, parse_invalidation
from scriptpool.config.wire import encode_input

if TYPE_CHECKING:
    from scriptpool.runtime._writes import AppWrites

log = get_logger("worker")


#: The bytes of data values one worker process keeps (their JSON text, plus
#: :data:`ENTRY_OVERHEAD` per entry); the least recently read go first.
STORE_CACHE_BYTES = 64 * 1024 * 1024
#: What an entry costs beyond its value's JSON: its key tuple (with a SESSION entry's digest),
#: its value tuple and expiry, and the ordered map's slot and links. Measured (tracemalloc, 50k
#: absent SESSION entries, the key string shared with the query as it is): about 355 bytes,
#: so 400; 200 let a 64 MiB budget hold about 113 MiB.
ENTRY_OVERHEAD = 400
#: How long an entry is used without reading Redis again, unless invalidated sooner.
BACKSTOP_S = 5.0

# (scope, app, shop or None, session or None, key): what one cached value is of.
EntryKey = tuple[str, str, "str | None", "str | None", str]


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A snapshot of the data cache's counters: reads served from memory (``hits``) and from
    Redis (``misses``) per scope, and what it holds."""

    hits: Mapping[str, int]
    misses: Mapping[str, int]
    entries: int
    bytes: int
    budget_bytes: int

    def hit_ratio(self, scope: str | None = None) -> float | None:
        """Hits over reads (of one scope, or all); None before any read."""
        scopes = SCOPES if scope is None else (scope,)
        hits = sum(self.hits.get(s, 0) for s in scopes)
        reads = hits + sum(self.misses.get(s, 0) for s in scopes)
        return hits / reads if reads else None


class StoreCache:
    """This process's hot script data. Thread-safe; keep one per process (per shard group).

    ``client`` is a redis-py client of the worker's shard group; ``coherent`` says whether the
    invalidation listener is subscribed now (what is read while it is not is not kept)."""

    def __init__(
        self,
        client: Any,
        keys: Keys,
        *,
        budget_bytes: int = STORE_CACHE_BYTES,
        backstop_s: float = BACKSTOP_S,
        coherent: Callable[[], bool] | None = None,
    ) -> None:
        self._redis = client
        self._keys = keys
        self.budget_bytes = budget_bytes
        self._backstop_s = backstop_s
        self.coherent: Callable[[], bool] = coherent or (lambda: True)
        # key -> (JSON text or None, size, monotonic expiry)
        self._items: OrderedDict[EntryKey, tuple[bytes | None, int, float]] = OrderedDict()
        self._bytes = 0
        self._loading: dict[EntryKey, object] = {}  # reads in flight, each with its token
        # (app, shop or None) -> entries held of it: a write's message about data this process
        # holds nothing of (most, in a group of many shops) costs one lookup.
        self._held: dict[tuple[str, str | None], int] = {}
        self._lock = threading.Lock()
        self._hits = dict.fromkeys(SCOPES, 0)
        self._misses = dict.fromkeys(SCOPES, 0)

    # -- reads -----------------------------------------------------------------------------
    def read(self, scope: str, app: str, shop: str, session: str | None, key: str) -> bytes | None:
        """The value of ``key`` in ``app``'s data of ``scope``: APP (every shop's), SHOP
        (``shop``'s) or SESSION (the session whose token's digest is ``session``,
        ``Keys.session_digest``, of ``shop``; none without a session), as the JSON text a
        script's input carries it (``encode_input``'s form); None when absent, or for an unknown
        scope. :class:`WorkerFailed` if Redis does not answer."""
        if scope == SESSION:
            if session is None:
                return None
            entry: EntryKey = (scope, app, shop, session, key)
        elif scope == SHOP:
            entry = (scope, app, shop, None, key)
        elif scope == APP:
            entry = (APP, app, None, None, key)
        else:
            return None
        now = time.monotonic()
        with self._lock:
            held = self._items.get(entry)
            if held is not None and held[2] > now:
                self._items.move_to_end(entry)
                self._hits[entry[0]] += 1
                return held[0]
            self._misses[entry[0]] += 1
            token = self._loading[entry] = object()
        try:
            value, size, expires = self._load(entry, now)
        except BaseException:
            with self._lock:
                if self._loading.get(entry) is token:
                    del self._loading[entry]
            raise
        keep = self.coherent()
        with self._lock:
            if self._loading.get(entry) is token:
                del self._loading[entry]
                if keep:
                    self._put(entry, value, size, expires)
        return value

    def _load(self, entry: EntryKey, started: float) -> tuple[bytes | None, int, float]:
        scope, app, shop, session, key = entry
        expires = started + self._backstop_s
        try:
            if scope == SESSION:
                assert shop is not None and session is not None
                name = self._keys.data_session_of_digest(app, shop, session)
                pipe = self._redis.pipeline(transaction=False)
                pipe.hget(name, key)
                pipe.pttl(name)
                raw, pttl = pipe.execute()
                if type(pttl) is int and pttl >= 0:
                    # Measured by Redis after ``started``: the value is gone by started + pttl
                    # at the latest, so it is never served past its TTL.
                    expires = min(expires, started + pttl / 1000)
            elif scope == SHOP:
                assert shop is not None
                raw = self._redis.hget(self._keys.data_shop(app, shop), key)
            else:
                raw = self._redis.hget(self._keys.data_app(app), key)
        except Exception as exc:  # Redis lost: the run fails by name, the worker lives on
            if not _redis_failure(exc):
                raise
            raise WorkerFailed(
                f"the worker could not read script data ({scope} {key!r}): {exc}", scope=scope
            ) from None
        if raw is None:
            return None, ENTRY_OVERHEAD, expires
        try:
            # Kept as the JSON text a script's input carries (encode_input's form), so that a
            # hot read is spliced into the input as it is, never decoded or encoded per call.
            text = encode_input(decode_value(raw))
        except (ValueError, RecursionError):  # InvalidInput is a ValueError too
            # Not written by DataStore or a script (both write JSON): read as absent, and said.
            log.warning("store_value_not_json", scope=scope, app=app, shop=shop, key=key[:80])
            return None, ENTRY_OVERHEAD, expires
        return text, len(text) + ENTRY_OVERHEAD, expires

    def _put(self, entry: EntryKey, value: bytes | None, size: int, expires: float) -> None:
        self._drop(entry)
        if size > self.budget_bytes:
            return
        self._items[entry] = (value, size, expires)
        self._bytes += size
        owner = (entry[1], entry[2])
        self._held[owner] = self._held.get(owner, 0) + 1
        while self._bytes > self.budget_bytes:
            gone, evicted = self._items.popitem(last=False)
            self._bytes -= evicted[1]
            self._unhold(gone)

    def _drop(self, entry: EntryKey) -> None:
        """(Under the lock.) Forget ``entry`` if held."""
        old = self._items.pop(entry, None)
        if old is not None:
            self._bytes -= old[1]
            self._unhold(entry)

    def _unhold(self, entry: EntryKey) -> None:
        owner = (entry[1], entry[2])
        left = self._held[owner] - 1
        if left:
            self._held[owner] = left
        else:
            del self._held[owner]

    # -- coherence -------------------------------------------------------------------------
    def invalidate(self, message: Any) -> None:
        """(The listener's thread.) Drop every entry a data message lists
        (``scriptpool.config.store.invalidation_message``: one call's keys; its text or, as the
        listener hands it over, the object it decodes to); ``None`` drops everything (on every
        (re)subscription). A malformed message is ignored."""
        if message is None:
            with self._lock:
                self._items.clear()
                self._loading.clear()
                self._held.clear()
                self._bytes = 0
            return
        event = parse_invalidation(message)
        if event is None:
            log.warning("store_invalidation_malformed", data=repr(message)[:200])
            return
        app, shop, session = event.app, event.shop_id, event.session
        with self._lock:
            if not self._loading and (app, None) not in self._held and (app, shop) not in self._held:
                return  # nothing of this app's data here, for every shop or for this one
            for scope, key in event.keys:
                if scope == APP:
                    entry: EntryKey = (APP, app, None, None, key)
                elif scope == SHOP:
                    entry = (SHOP, app, shop, None, key)
                else:
                    entry = (SESSION, app, shop, session, key)
                self._loading.pop(entry, None)
                self._drop(entry)

    def forget_written(self, shop: str, session: str | None, writes: Iterable[AppWrites]) -> None:
        """Drop what a call at ``shop`` (with the session token ``session``) just wrote, at once:
        this process's next job must not wait for the write's message to read it."""
        digest = None if session is None else Keys.session_digest(session)
        with self._lock:
            for done in writes:
                for write in done.writes:
                    if write.scope == SESSION:
                        entry: EntryKey = (SESSION, done.app, shop, digest, write.key)
                    else:
                        entry = (write.scope, done.app, None if write.scope == APP else shop, None, write.key)
                    self._loading.pop(entry, None)
                    self._drop(entry)

    def stats(self) -> StoreStats:
        """The counters now."""
        with self._lock:
            return StoreStats(
                dict(self._hits), dict(self._misses), len(self._items), self._bytes, self.budget_bytes
            )


def _redis_failure(exc: BaseException) -> bool:
    import redis

    return isinstance(exc, (redis.RedisError, OSError))


# Where a read value goes in an input: the projection carries a placeholder string in its place,
# and the input's JSON text gets the value's text spliced in, in one pass (a value that holds
# text like a placeholder is never scanned again). Random per process, so no input or stored
# value can name one.
_NONCE = os.urandom(12).hex()
_PLACEHOLDER = re.compile(rb'"@@sp-store-' + _NONCE.encode() + rb'-(\d+)@@"')


def placeholder(index: int) -> str:
    """The string standing for the ``index``-th value read in one input, until :func:`splice`."""
    return f"@@sp-store-{_NONCE}-{index}@@"


def splice(result: Any, texts: list[bytes]) -> bytes:
    """``result``'s JSON text (``encode_input``) with each placeholder replaced by its value's."""
    return _PLACEHOLDER.sub(lambda found: texts[int(found[1])], encode_input(result))


class DataContext:
    """What a call's scripts read their data through: the process's cache and the call's
    session (its token, hashed once per call and only if a script reads SESSION data). Each
    app reads its own data of the call's shop (:meth:`read` takes both)."""

    __slots__ = ("_digest", "session", "store")

    def __init__(self, store: StoreCache, session: str | None) -> None:
        self.store = store
        self.session = session
        self._digest: str | None = None

    def read(self, app: str, shop: str, scope: str, key: str) -> bytes | None:
        """The JSON text of ``key`` in ``app``'s data of ``scope`` for this call at ``shop``
        (None: absent)."""
        digest = None
        if scope == SESSION and self.session is not None:
            digest = self._digest
            if digest is None:
                digest = self._digest = Keys.session_digest(self.session)
        return self.store.read(scope, app, shop, digest, key)
