"""The registry across shard groups, with durable writes: one :class:`Registry` per group's Redis.

A shop's bindings, history and modules live in its shard's group; extension points and providers
in every group. Every write made here is acknowledged only once the group's required replicas
have it (``SCRIPTPOOL_DEPLOY_REPLICAS``, ``WAIT`` after the write): the registry itself writes as
it always does, and this module only chooses the Redis and waits afterwards.

Why a fresh one-connection session per write (``scriptpool.config.redis.WriteSession``): ``WAIT`` counts the
writes of its own connection, so it must follow the registry's writes, pipelines and scripts on
that same connection, and a connection that broke and reconnected in between (perhaps to a
promoted replica) would answer for nothing it wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import redis

from scriptpool.config import Settings, ShardGroup, check_shop_id, shard_for
from scriptpool.config.errors import BrokerUnavailable, NotReplicated, ScriptpoolError
from scriptpool.config.redis import WriteSession, describe_redis_url, redis_client, redis_failure
from scriptpool.engine import Sandbox
from scriptpool.registry._registry import Registry

T = TypeVar("T")
_TRANSPORT = (redis.ConnectionError, redis.TimeoutError, OSError)


class Registries:
    """Registries per shard group of ``settings``, and the durable writes on them.

    ``durable(group, ...)`` yields a registry whose writes are confirmed by the group's replicas
    when the block ends; ``on_shop`` picks the shop's group; ``everywhere`` runs a write on every
    group. ``reader(group)`` is for reads only and keeps its pooled connections.
    """

    def __init__(self, settings: Settings, sandbox: Sandbox | None = None, *, timeout_s: float = 5.0) -> None:
        self.settings = settings
        self.sandbox = sandbox or Sandbox()
        self._timeout_s = timeout_s
        self._readers: dict[str, Registry] = {}

    @property
    def groups(self) -> tuple[ShardGroup, ...]:
        return self.settings.groups

    def group_of_shop(self, shop_id: str | int) -> ShardGroup:
        """The group whose Redis holds ``shop_id``'s bindings."""
        return self.settings.group_of(shard_for(check_shop_id(shop_id), self.settings.shards))

    def reader(self, group: ShardGroup) -> Registry:
        """A registry on ``group``'s Redis for lookups (pooled, follows a failover by itself)."""
        registry = self._readers.get(group.url)
        if registry is None:
            client = redis_client(group.url, timeout=self._timeout_s, connect_timeout=2)
            registry = Registry(client, self.settings.for_group(group), self.sandbox)
            self._readers[group.url] = registry
        return registry

    def reader_for_shop(self, shop_id: str | int) -> Registry:
        return self.reader(self.group_of_shop(shop_id))

    @contextmanager
    def durable(self, group: ShardGroup, *, what: str, again: str) -> Iterator[Registry]:
        """A registry for one write to ``group``, confirmed when the block ends.

        ``what`` names the write and ``again`` says how to make it again, for the
        :class:`NotReplicated` raised when fewer replicas than required acknowledge it in time.
        """
        replicas = self.settings.deploy_replicas_for(group.url)
        wait_ms = self.settings.deploy_wait_ms
        timeout = max(self._timeout_s, wait_ms / 1000 + 1.0)  # the socket outlasts the WAIT
        try:
            session = WriteSession(group.url, timeout=timeout, connect_timeout=2)
        except _TRANSPORT as exc:
            raise _unreachable(group, exc) from None
        try:
            try:
                yield Registry(session.client, self.settings.for_group(group), self.sandbox)
            except _TRANSPORT as exc:
                raise _unreachable(group, exc) from None
            if replicas <= 0:
                return
            try:
                acknowledged = session.confirm(replicas, wait_ms)
            except _TRANSPORT as exc:
                raise NotReplicated(
                    f"{what} reached the primary of {group.describe()}, but the connection broke before "
                    f"{replicas} replica(s) confirmed it ({exc}), so whether it is still there is "
                    f"unknown. Once Redis answers again, check it and {again}.",
                    acknowledged=None,
                    required=replicas,
                    timeout_ms=wait_ms,
                    group=group.name,
                ) from None
            if acknowledged < replicas:
                raise NotReplicated(
                    f"{what} is live on the primary of {group.describe()}, but only {acknowledged} of "
                    f"{replicas} replica(s) acknowledged it within {wait_ms} ms, so a failover now would "
                    "lose it. Check the replicas (INFO replication on the primary, or SENTINEL replicas "
                    f"on a sentinel), then {again}; the write counts as acknowledged only then "
                    "(SCRIPTPOOL_DEPLOY_REPLICAS and SCRIPTPOOL_DEPLOY_WAIT_MS set what is waited for).",
                    acknowledged=acknowledged,
                    required=replicas,
                    timeout_ms=wait_ms,
                    group=group.name,
                )
        finally:
            session.close()

    @contextmanager
    def on_shop(self, shop_id: str | int, *, what: str, again: str) -> Iterator[Registry]:
        """:meth:`durable` on the group of ``shop_id``."""
        with self.durable(self.group_of_shop(shop_id), what=what, again=again) as registry:
            yield registry

    def everywhere(self, write: Callable[[Registry], T], *, what: str, again: str) -> list[T]:
        """Run ``write`` durably on every group, in order. A group that fails does not stop the
        others; the first failure is raised afterwards, saying which groups have the write, so
        running the same command again heals the rest (``scriptpool status`` lists a group that
        misses an extension point or provider)."""
        results: list[T] = []
        done: list[str] = []
        failures: list[tuple[ShardGroup, ScriptpoolError]] = []
        for group in self.groups:
            try:
                with self.durable(group, what=what, again=again) as registry:
                    results.append(write(registry))
                done.append(group.name)
            except NotReplicated as exc:
                failures.append((group, exc))
                done.append(group.name)  # it is there, only not yet known durable
            except BrokerUnavailable as exc:
                failures.append((group, exc))
        if not failures:
            return results
        first = failures[0][1]
        if len(self.groups) == 1:
            raise first
        missing = [group.name for group, exc in failures if not isinstance(exc, NotReplicated)]
        message = (
            f"{first.message} ({what}: done in group(s) {', '.join(done) or 'none'}; not acknowledged "
            f"in {', '.join(g.name for g, _ in failures)}: {again} to reach every group"
        )
        if missing:
            message += f"; until then group(s) {', '.join(missing)} miss it"
        raise type(first)(message + ")", **first.detail)


def _unreachable(group: ShardGroup, exc: BaseException) -> BrokerUnavailable:
    where = describe_redis_url(group.url)
    message = redis_failure(f"of {group.describe()}", exc)
    return BrokerUnavailable(message, group=group.name, redis=where)
