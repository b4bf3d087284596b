"""The registries the registry commands (and others: ``rollout``, ``runs``, ``status``) work
on, opened from the settings; and what those commands share."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import redis

from scriptpool.config import Settings
from scriptpool.config.errors import BrokerUnavailable
from scriptpool.config.redis import redis_failure

if TYPE_CHECKING:
    from scriptpool.engine import Sandbox
    from scriptpool.registry import Registries, Registry

# What a lost or unreachable Redis raises.
TRANSPORT = (redis.ConnectionError, redis.TimeoutError, OSError)


def open_registries(settings: Settings, sandbox: Sandbox | None = None) -> Registries:
    """The registry of every shard group, with its own sandbox for validating and compiling.
    Writes go through ``durable``/``on_shop``/``everywhere`` (acknowledged once the replicas
    ``SCRIPTPOOL_DEPLOY_REPLICAS`` asks for have them); reads through ``reader``."""
    from scriptpool.registry import Registries

    return Registries(settings, sandbox)


def open_registry(settings: Settings, sandbox: Sandbox | None = None) -> Registry:
    """A registry for reading extension points and providers (kept in every group): the first
    group whose Redis answers. Modules it compiles run only on ``sandbox``'s engines (its own
    sandbox unless given)."""
    registries = open_registries(settings, sandbox)
    failure: BrokerUnavailable | None = None
    for group in registries.groups:
        registry = registries.reader(group)
        try:
            registry.extension_points()  # one round trip: is this group's Redis there?
        except TRANSPORT as exc:
            failure = failure or BrokerUnavailable(redis_failure(f"of {group.describe()}", exc))
            continue
        return registry
    assert failure is not None
    raise failure


def utc_text(timestamp: float) -> str:
    """A time as the registry commands show it: UTC, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))
