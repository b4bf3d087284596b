"""The input queries bound at an (EP, shop), as a client holds them, and the projection of a
host's input through them: what a call to an EP with an input schema sends.

Only EPs whose definition has an ``input_graphql`` come here; a call to any other EP sends its
input as it always did. For one that has, the client reads the binding hash of (EP, shop) (one
HGETALL, on the group's reader threads: never on a caller's event loop), compiles each app's
query against the EP's schema once (by digest), merges them (``merge``: the union of what they
select) and keeps that per (EP, shop) in a bounded LRU, for at most ``QUERY_CACHE_TTL_S`` (the
backstop for an invalidation missed while the subscription stayed up). An :class:`InvalidationListener` on the
group's invalidation channel drops an entry as soon as a deploy, rollback or rollout of that
(EP, shop) is published, and an EP's entries (with its cached definition) when the EP is
redefined; a read that an invalidation overtook is used once but not kept, and nothing is kept
while the listener is not subscribed (what it missed then could be stale).

The input a call sends (:func:`prepare`, :func:`prepare_async`): when every bound app has a
query, the host's input projected through the merged plan (loaders called only if selected, at
most once); when some app has none, that app needs the whole input, so every loader is called
(``materialise``) and the fields only the queries' arguments give (``name({...})``) are added,
so the apps with queries still read theirs.

Long on purpose (past 450 lines): the cache, its reads and its invalidation share one lock and
one notion of "kept only if nothing overtook the read"; the projection helpers below are what a
call does with what the cache gives.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from scriptpool.config import Keys, get_logger
from scriptpool.config.errors import ClientClosed, InvalidInput, ScriptpoolError
from scriptpool.config.extension_points import REDUCER_APP
from scriptpool.config.redis import InvalidationListener
from scriptpool.config.wire import encode_input, query_digest

if TYPE_CHECKING:
    from scriptpool.config.input_query import InputSchema, Projection

log = get_logger("client")

# (EP, shop) pairs whose bound queries one group's link keeps; the least recently used goes first.
QUERY_CACHE_ENTRIES = 4_096
# How long an entry is used without reading Redis again: the backstop, as for the client's EP
# definitions (scriptpool.producer._group) and a worker's bindings, for an invalidation missed
# while the subscription stayed up.
QUERY_CACHE_TTL_S = 5.0
# Queries and schemas compiled, by digest: deploys are rare, so this holds every live one.
_COMPILED_ENTRIES = 1_024
_SCHEMAS = 64
# The caps a stored query is compiled under here. The deploy held it to its EP's caps; an EP
# that lowers its caps later must not break the queries already bound, so these are the widest
# an EP may set (scriptpool.config.extension_points).
_RUN_MAX_BYTES = 65_536
_RUN_MAX_COST = 1_000
# The key under which a job names a rollout candidate's query (no app name starts with '#').
CANDIDATE_KEY = "#candidate"
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class BoundQueries:
    """What the apps bound at one (EP, shop) read of the input, as one read saw them.

    ``merged``: the union of the queries' plans (None: no app has a query); ``whole``: some app
    has no query (or one that cannot be compiled), so the whole input is sent; ``digests``: app
    (and ``#candidate``) -> its query's digest, "" for none, as the job carries it."""

    merged: Projection | None
    whole: bool
    digests: dict[str, str]

    def selection(self) -> dict[str, Any] | None:
        """What a host must load for these apps (nested dicts, see ``Projection.selection``),
        or None when some app takes the whole input."""
        if self.whole or self.merged is None:
            return None
        return self.merged.selection()


class QueryBook:
    """One group's cache of bound input queries, its reads and its invalidation listener.

    ``readers`` are the group's EP reader threads; ``forget_ep(name | None)`` drops the client's
    cached EP definition(s) when an invalidation names an EP (its schema may have changed)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        url: str,
        readers: ThreadPoolExecutor,
        forget_ep: Callable[[str | None], None],
        group: str,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._url = url
        self._readers = readers
        self._forget_ep = forget_ep
        self._group = group
        self._lock = threading.Lock()
        # (EP, shop) -> the queries and when (time.monotonic()) they expire.
        self._entries: OrderedDict[tuple[str, str], tuple[BoundQueries, float]] = OrderedDict()
        self._reads: dict[tuple[str, str], Future[BoundQueries]] = {}
        self._changes = 0  # invalidations heard: a read that one overtook is not kept
        self._schemas: dict[str, InputSchema] = {}
        self._plans: dict[tuple[str, str], Projection | None] = {}
        self._listener: InvalidationListener | None = None
        self._stopped = False

    # -- the cache ---------------------------------------------------------------------------
    def fresh(self, ep: str, shop: str) -> BoundQueries | None:
        """The queries bound at (``ep``, ``shop``) if known (and not expired), without asking
        Redis."""
        with self._lock:
            found = self._entries.get((ep, shop))
            if found is None:
                return None
            if found[1] <= time.monotonic():
                del self._entries[(ep, shop)]
                return None
            self._entries.move_to_end((ep, shop))
            return found[0]

    def read(self, ep: str, shop: str, sdl: str) -> Future[BoundQueries]:
        """The queries bound at (``ep``, ``shop``), read on the group's reader threads (a read
        in flight for the pair is shared); the future holds a Redis error or
        :class:`ClientClosed` if that is how it ended. Starts the listener on first use."""
        self._listen()
        key = (ep, shop)
        with self._lock:
            future = self._reads.get(key)
            if future is not None:
                return future
            future = self._reads[key] = Future()
            changes = self._changes
        try:
            self._readers.submit(self._read, key, sdl, changes, future)
        except RuntimeError:  # shut down: the client closed meanwhile
            self._settle(key, future, ClientClosed("the client is closed"))
        return future

    def invalidate(self, ep: str | None, shop: str | None) -> None:
        """(The listener's thread.) Forget what an invalidation names: one pair, an EP (with its
        definition), or everything (on every (re)subscription)."""
        with self._lock:
            self._changes += 1
            if ep is None:
                self._entries.clear()
            elif shop is None:
                for key in [k for k in self._entries if k[0] == ep]:
                    del self._entries[key]
            else:
                self._entries.pop((ep, shop), None)
        if shop is None:
            self._forget_ep(ep)

    def stop(self) -> None:
        """Stop the listener; reads still waiting are settled by the link's reader shutdown."""
        with self._lock:
            self._stopped = True
            listener, self._listener = self._listener, None
            pending = list(self._reads.items())
        if listener is not None:
            listener.stop()
        for key, future in pending:
            self._settle(key, future, ClientClosed("the client is closed"))

    @property
    def listening(self) -> bool:
        """Whether the invalidation listener is subscribed now (what tests wait for)."""
        listener = self._listener
        return listener is not None and listener.subscribed

    def _listen(self) -> None:
        if self._listener is not None or self._stopped:
            return
        with self._lock:
            if self._listener is not None or self._stopped:
                return
            self._listener = InvalidationListener(
                self._url,
                self._keys.invalidations(),
                self.invalidate,
                name="client_invalidation_listener",
                logger=log,
            ).start()

    # -- one read ----------------------------------------------------------------------------
    def _read(self, key: tuple[str, str], sdl: str, changes: int, future: Future[BoundQueries]) -> None:
        listener = self._listener
        # Kept only if the listener was subscribed when the read began and heard nothing since:
        # then no deploy can have slipped between the read and the cache.
        keep = listener is not None and listener.subscribed
        try:
            bound = self._bound(key, sdl)
        except Exception as exc:  # Redis failing (the caller falls back), or a bug: never a hang
            if not isinstance(exc, (redis.RedisError, OSError)):
                log.exception("input_query_read_failed", ep=key[0], shop=key[1], group=self._group)
            self._settle(key, future, exc)
            return
        with self._lock:
            if keep and self._changes == changes and not self._stopped:
                self._entries[key] = (bound, time.monotonic() + QUERY_CACHE_TTL_S)
                self._entries.move_to_end(key)
                while len(self._entries) > QUERY_CACHE_ENTRIES:
                    self._entries.popitem(last=False)
        self._settle(key, future, bound)

    def _bound(self, key: tuple[str, str], sdl: str) -> BoundQueries:
        ep, shop = key
        try:
            fields = self._redis.hgetall(self._keys.binding(ep, shop))
        except redis.ResponseError:  # WRONGTYPE: a binding from before apps, so before queries
            fields = {}
        texts: dict[str, str | None] = {}
        for raw_name, raw in fields.items():
            name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
            if name == CANDIDATE_KEY:
                texts[CANDIDATE_KEY] = _stored_query(raw, candidate=True)
            elif not name.startswith("#"):
                texts[name] = _stored_query(raw, candidate=False)
        apps = [name for name in texts if name != CANDIDATE_KEY]
        if len(apps) > 1:
            texts.pop(REDUCER_APP, None)  # a join's reducer reads the outputs, never the input
        plans: list[Projection] = []
        digests: dict[str, str] = {}
        whole = False
        for name, text in texts.items():
            if text is None:
                digests[name] = ""
                whole = True
                continue
            digest = query_digest(text)
            digests[name] = digest
            plan = self._plan(ep, shop, name, sdl, text, digest)
            if plan is None:
                whole = True  # the worker refuses it by name; the others still get their input
            else:
                plans.append(plan)
        from scriptpool.config.input_query import merge

        return BoundQueries(_without_store(merge(plans)) if plans else None, whole, digests)

    def _plan(self, ep: str, shop: str, app: str, sdl: str, text: str, digest: str) -> Projection | None:
        sdl_digest = query_digest(sdl)
        key = (sdl_digest, digest)
        found = self._plans.get(key, _MISSING)
        if found is not _MISSING:
            return found  # type: ignore[no-any-return]
        from scriptpool.config.input_query import InputQuery, InputSchema

        plan: Projection | None
        try:
            schema = self._schemas.get(sdl_digest)
            if schema is None:
                if len(self._schemas) >= _SCHEMAS:
                    self._schemas.clear()
                schema = self._schemas[sdl_digest] = InputSchema.from_sdl(sdl)
            query = InputQuery.compile(schema, text, max_bytes=_RUN_MAX_BYTES, max_cost=_RUN_MAX_COST)
            plan = query.plan()
        except ScriptpoolError as exc:
            # Deployed against another schema (the EP was redefined since) or written to Redis by
            # hand: sending the whole input lets the worker refuse it by name.
            log.warning("input_query_unusable", ep=ep, shop=shop, app=app, problem=exc.message[:200])
            plan = None
        if len(self._plans) >= _COMPILED_ENTRIES:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _settle(self, key: tuple[str, str], future: Future[BoundQueries], result: Any) -> None:
        with self._lock:
            if self._reads.get(key) is future:
                del self._reads[key]
        try:
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        except InvalidStateError:  # settled already, by close or by the read
            pass


def _without_store(plan: Projection) -> Projection:
    """The merged plan without the root's ``store`` fields: script data is the worker's to
    resolve from what it holds (``scriptpool.runtime._store``), so the host neither loads nor
    sends it; those fields are absent from what is sent, not null."""
    from scriptpool.config.input_query import STORE_FIELD, Projection

    kind, non_null, type_name, fields = plan.root
    kept = tuple(f for f in fields if f[1] != STORE_FIELD)
    if len(kept) == len(fields):
        return plan
    return Projection(root=(kind, non_null, type_name, kept), merged=True)


def _stored_query(raw: bytes | str, *, candidate: bool) -> str | None:
    """The input query a binding field holds (None: none, or a field that cannot be read: the
    worker names what is wrong with it; this side then sends the whole input)."""
    try:
        data = json.loads(raw)
        if candidate:
            data = data.get("deployment")
        query = data.get("input_query") if isinstance(data, dict) else None
    except (ValueError, AttributeError, RecursionError):
        return None
    return query if isinstance(query, str) else None


# -- the input a call sends -----------------------------------------------------------------------


def prepare(bound: BoundQueries, value: Any) -> tuple[Any, bytes]:
    """The value to send for ``bound`` and its JSON text: projected through the merged plan
    when every app has a query; else the whole input with every loader called."""
    memo: dict[Any, Any] = {}
    union = bound.merged.project(value, memo=memo) if bound.merged is not None else _MISSING
    if not bound.whole:
        return union, encode_input(union)
    if union is _MISSING:
        try:
            return value, encode_input(value)  # no loaders: the input as it came, at today's cost
        except InvalidInput:
            pass
    full = _materialise(value, _Loads(memo, sync=True))
    if union is not _MISSING:
        full = _overlay(full, union)
    return full, encode_input(full)


async def prepare_async(bound: BoundQueries, value: Any) -> tuple[Any, bytes]:
    """Like :func:`prepare`, awaiting what loaders return when it is awaitable."""
    memo: dict[Any, Any] = {}
    union = await bound.merged.project_async(value, memo=memo) if bound.merged is not None else _MISSING
    if not bound.whole:
        return union, encode_input(union)
    if union is _MISSING:
        try:
            return value, encode_input(value)
        except InvalidInput:
            pass
    full = await _materialise_async(value, _Loads(memo, sync=False))
    if union is not _MISSING:
        full = _overlay(full, union)
    return full, encode_input(full)


class _Loads:
    """The loaders of one call's whole input: ``memo`` is the merged projection's, keyed
    (id(loader), argument key), "" for no arguments (scriptpool.config.input_query), so a
    loader the projection called already is not called again; ``with_arguments`` holds the ids
    of those it called with arguments, read once here rather than per loader; ``sync``: on
    ``run``, where a loader must not return an awaitable."""

    __slots__ = ("memo", "sync", "with_arguments")

    def __init__(self, memo: dict[Any, Any], *, sync: bool) -> None:
        self.memo = memo
        self.sync = sync
        self.with_arguments = {key[0] for key in memo if type(key) is tuple and key[1]}


def _loaded(loader: Any, loads: _Loads) -> Any:
    memo = loads.memo
    hit = memo.get((id(loader), ""), _MISSING)
    if hit is not _MISSING:
        return hit[1]
    if _takes_arguments(loader, loads):
        return _MISSING
    value = loader()
    if loads.sync and inspect.isawaitable(value):
        close = getattr(value, "close", None)
        if close is not None:
            close()  # a coroutine never awaited would warn
        raise InvalidInput(
            f"a loader in the input ({_named(loader)}) returned an awaitable: use run_async for "
            "asynchronous loaders"
        )
    memo[(id(loader), "")] = (loader, value)
    return value


def _named(loader: Any) -> str:
    return str(getattr(loader, "__qualname__", None) or type(loader).__name__)[:100]


def _takes_arguments(loader: Any, loads: _Loads) -> bool:
    """A loader for a field with arguments cannot be called without them: it is left out of the
    whole input (its values for the bound queries' arguments are added by ``_overlay``)."""
    if id(loader) in loads.with_arguments:
        return True
    try:
        inspect.signature(loader).bind()
    except TypeError:
        return True
    except ValueError:  # no signature to read (a builtin): call it as a zero-argument loader
        return False
    return False


def _materialise(value: Any, loads: _Loads) -> Any:
    """``value`` with every zero-argument loader called (once), recursively."""
    if type(value) in _LEAVES or value is None:
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if item is not None and type(item) not in _LEAVES and callable(item):
                item = _loaded(item, loads)
                if item is _MISSING:
                    continue
            out[key] = _materialise(item, loads)
        return out
    if isinstance(value, (list, tuple)):
        return [_materialise(_call_item(item, loads), loads) for item in value]
    if callable(value):
        loaded = _loaded(value, loads)
        return None if loaded is _MISSING else _materialise(loaded, loads)
    return value  # not JSON: encode_input names it


def _call_item(item: Any, loads: _Loads) -> Any:
    if item is not None and type(item) not in _LEAVES and callable(item):
        loaded = _loaded(item, loads)
        return None if loaded is _MISSING else loaded
    return item


async def _materialise_async(value: Any, loads: _Loads) -> Any:
    if type(value) in _LEAVES or value is None:
        return value
    if callable(value) and not isinstance(value, Mapping):
        loaded = _loaded(value, loads)
        if loaded is _MISSING:
            return None
        if inspect.isawaitable(loaded):
            loaded = await loaded
            loads.memo[(id(value), "")] = (value, loaded)
        return await _materialise_async(loaded, loads)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            loader = item is not None and type(item) not in _LEAVES and callable(item)
            if loader and _takes_arguments(item, loads):
                continue
            out[key] = await _materialise_async(item, loads)
        return out
    if isinstance(value, (list, tuple)):
        return [await _materialise_async(item, loads) for item in value]
    if inspect.isawaitable(value):
        return await _materialise_async(await value, loads)
    return value


_LEAVES = frozenset({str, int, float, bool})


def _overlay(full: Any, union: Any) -> Any:
    """``full`` (the whole input) with what only ``union`` (the merged projection of the same
    input) has: the fields that the queries' arguments give, under their canonical keys."""
    if type(union) is dict and isinstance(full, dict):
        for key, item in union.items():
            mine = full.get(key, _MISSING)
            if mine is _MISSING:
                full[key] = item
            elif type(item) is dict or type(item) is list:
                full[key] = _overlay(mine, item)
        return full
    if type(union) is list and isinstance(full, list) and len(full) == len(union):
        return [_overlay(a, b) for a, b in zip(full, union, strict=True)]
    return full
