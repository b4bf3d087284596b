"""The partner-facing data API: ``DataStore`` sets, reads, lists and deletes an app's APP and
SHOP data (README, "Script data and sessions").

APP data is written to every shard group's Redis, as extension points are (a worker reads only
its own group's); SHOP data to the group of the shop's shard. Every write goes through
``scriptpool.config.store.apply_writes``: the limits are checked there, atomically, and every
worker hears of the change on the invalidation channel.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import redis

from scriptpool.config import Settings, ShardGroup, check_app, check_shop_id, shard_for
from scriptpool.config.errors import BrokerUnavailable, ScriptpoolError
from scriptpool.config.redis import redis_client, redis_failure
from scriptpool.config.store import (
    APP,
    SHOP,
    Write,
    apply_writes,
    check_key,
    check_session_token,
    decode_value,
    encode_value,
    hash_sizes,
)

_TRANSPORT = (redis.ConnectionError, redis.TimeoutError, OSError)


class DataStore:
    """An app's script data in every shard group of ``settings``.

    ``shop=None`` means the APP scope (the app's data for every shop); a shop id, the SHOP scope
    (the app's data for that shop). Values are JSON (what ``json.dumps`` takes: objects, arrays,
    strings, finite numbers, booleans, None). A write over a limit is
    :class:`~scriptpool.config.errors.StoreLimitExceeded` and writes nothing; a Redis that does
    not answer is :class:`~scriptpool.config.errors.BrokerUnavailable` naming its group.
    Thread-safe (redis-py's pools are); ``close`` releases the connections.
    """

    def __init__(self, settings: Settings | None = None, *, timeout_s: float = 5.0) -> None:
        self.settings = settings or Settings.from_env()
        self._timeout_s = timeout_s
        self._clients: dict[str, redis.Redis] = {}

    def __enter__(self) -> DataStore:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection this store opened."""
        clients, self._clients = self._clients, {}
        for client in clients.values():
            client.close()
            client.connection_pool.disconnect()

    # -- writes ---------------------------------------------------------------------------------
    def set(self, app: str, key: str, value: Any, *, shop: str | int | None = None) -> int:
        """Store ``value`` under ``key`` (APP scope, or SHOP scope of ``shop``); returns the bytes
        its JSON text takes."""
        scope, shop_id = self._scope(app, shop)
        check_key(key, scope)
        encoded = encode_value(value, scope=scope, key=key)
        self._write(app, shop_id, Write(scope, key, encoded))
        return len(encoded)

    def delete(self, app: str, key: str, *, shop: str | int | None = None) -> bool:
        """Delete ``key``; whether it was there (in any group, for APP data)."""
        scope, shop_id = self._scope(app, shop)
        check_key(key, scope)
        existed = any(
            self._call(group, lambda c, g=group: c.hexists(self._hash(g, app, shop_id), key))
            for group in self._groups(shop_id)
        )
        self._write(app, shop_id, Write(scope, key, None))
        return existed

    # -- reads ----------------------------------------------------------------------------------
    def get(self, app: str, key: str, *, shop: str | int | None = None, default: Any = None) -> Any:
        """The value under ``key``, or ``default`` when there is none. APP data is read from the
        first shard group (every group holds the same)."""
        raw = self._read_raw(app, key, shop)
        return default if raw is None else decode_value(raw)

    def get_raw(self, app: str, key: str, *, shop: str | int | None = None) -> bytes | None:
        """The JSON text stored under ``key`` as it is stored (minified), or None."""
        return self._read_raw(app, key, shop)

    def list(self, app: str, *, shop: str | int | None = None) -> dict[str, int]:
        """Every key of the scope, sorted, with the bytes its value's JSON text takes."""
        _, shop_id = self._scope(app, shop)
        group = self._groups(shop_id)[0]
        raw = self._call(group, lambda c: c.hgetall(self._hash(group, app, shop_id)))
        return hash_sizes(raw)

    def get_session(self, app: str, shop: str | int, token: str) -> dict[str, Any]:
        """Everything one session holds (for operators and debugging): key -> value; empty when
        the session has expired or was never written."""
        check_app(app)
        shop_id = check_shop_id(shop)
        check_session_token(token)
        group = self._group_of(shop_id)
        name = self.settings.for_group(group).keys.data_session(app, shop_id, token)
        raw = self._call(group, lambda c: c.hgetall(name))
        return {_text(k): decode_value(v) for k, v in sorted(raw.items())}

    # -- helpers --------------------------------------------------------------------------------
    def _scope(self, app: str, shop: str | int | None) -> tuple[str, str | None]:
        check_app(app)
        if shop is None:
            return APP, None
        return SHOP, check_shop_id(shop)

    def _group_of(self, shop_id: str) -> ShardGroup:
        return self.settings.group_of(shard_for(shop_id, self.settings.shards))

    def _groups(self, shop_id: str | None) -> tuple[ShardGroup, ...]:
        """Where the scope lives: every group for APP data, the shop's group for SHOP data."""
        return self.settings.groups if shop_id is None else (self._group_of(shop_id),)

    def _hash(self, group: ShardGroup, app: str, shop_id: str | None) -> str:
        keys = self.settings.for_group(group).keys
        return keys.data_app(app) if shop_id is None else keys.data_shop(app, shop_id)

    def _read_raw(self, app: str, key: str, shop: str | int | None) -> bytes | None:
        scope, shop_id = self._scope(app, shop)
        check_key(key, scope)
        group = self._groups(shop_id)[0]
        raw: bytes | None = self._call(group, lambda c: c.hget(self._hash(group, app, shop_id), key))
        return raw

    def _write(self, app: str, shop_id: str | None, write: Write) -> None:
        """Apply one write in every group of its scope, in order. A refusal stops at the first
        group that refuses; a group that cannot be reached does not stop the others, and the
        error raised afterwards names the groups that have the write (writing again heals the
        rest)."""
        groups = self._groups(shop_id)
        done: list[str] = []
        failures: list[tuple[ShardGroup, ScriptpoolError]] = []
        for group in groups:
            keys = self.settings.for_group(group).keys
            try:
                refusal = self._call(group, lambda c, k=keys: apply_writes(c, k, app, shop_id, None, [write]))
            except BrokerUnavailable as exc:
                failures.append((group, exc))
                continue
            if refusal is not None:
                error = refusal.error()
                if done:
                    error.message += (
                        f" (group(s) {', '.join(done)} took it before group {group.name} refused)"
                    )
                    error.args = (error.message,)
                raise error
            done.append(group.name)
        if not failures:
            return
        first = failures[0][1]
        if len(groups) == 1:
            raise first
        raise BrokerUnavailable(
            f"{first.message} (APP data {app}/{write.key}: written in group(s) {', '.join(done) or 'none'}, "
            f"not in {', '.join(g.name for g, _ in failures)}: write it again to reach every group)",
            **first.detail,
        )

    def _client(self, group: ShardGroup) -> redis.Redis:
        client = self._clients.get(group.url)
        if client is None:
            client = redis_client(group.url, timeout=self._timeout_s, connect_timeout=2)
            self._clients[group.url] = client
        return client

    def _call(self, group: ShardGroup, action: Any) -> Any:
        """``action(client)`` on ``group``'s Redis; a Redis that does not answer is one
        :class:`BrokerUnavailable` naming the group."""
        try:
            return action(self._client(group))
        except _TRANSPORT as exc:
            raise BrokerUnavailable(redis_failure(f"of {group.describe()}", exc), group=group.name) from None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
