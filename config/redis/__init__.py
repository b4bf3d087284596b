"""Redis connections, the one public way in: every client, pool and broker setting the project
opens, the URL forms behind them, and the loop that keeps a Redis session alive.

A submodule of its own rather than names of ``scriptpool.config``: connections are a subject
with a dozen names, which most of the core (settings, keys, limits, wire types) never needs, and
``from scriptpool.config.redis import redis_client`` says what a module talks to. Its files are
private; import from here.

URLs (``_urls``: text only, no connection):

* :func:`check_redis_url`: the URL or one clear error naming the setting it came from;
* :func:`describe_redis_url`, :func:`redact`: where a URL points, without its passwords;
* :func:`is_sentinel`, :func:`parse_sentinel_url`, :class:`SentinelURL`: the
  ``sentinel://h1,h2,h3/MASTER/DB`` form;
* :func:`redis_tls_options`: a TLS URL's options for kombu's broker connection.

Connections (``_clients``, ``_primary``):

* :func:`redis_client`, :func:`redis_pool`: a client or pool with explicit timeouts, direct or
  through Sentinel;
* :class:`WriteSession`: durable writes on one connection, confirmed by ``WAIT``;
* :func:`celery_broker`: Celery's broker settings, connecting as our own clients do;
* :func:`redis_failure`: what a failure to use a Redis means to a user;
* :func:`primary_address`, :class:`PrimaryCheck`: where Sentinel says the primary is now.

Sessions (``_reconnect``, ``_invalidation``): :class:`Reconnector`, the one reconnect loop with
capped backoff; :class:`InvalidationListener`, the subscription to the invalidation channel that
keeps a worker's (and a client's) caches of bindings and EP definitions coherent.
"""

from scriptpool.config.redis._clients import (
    WriteSession,
    celery_broker,
    redis_client,
    redis_failure,
    redis_pool,
)
from scriptpool.config.redis._invalidation import InvalidationListener
from scriptpool.config.redis._primary import PrimaryCheck, primary_address
from scriptpool.config.redis._reconnect import Reconnector
from scriptpool.config.redis._urls import (
    SentinelURL,
    check_redis_url,
    describe_redis_url,
    is_sentinel,
    parse_sentinel_url,
    redact,
    redis_tls_options,
)

__all__ = [
    "InvalidationListener",
    "PrimaryCheck",
    "Reconnector",
    "SentinelURL",
    "WriteSession",
    "celery_broker",
    "check_redis_url",
    "describe_redis_url",
    "is_sentinel",
    "parse_sentinel_url",
    "primary_address",
    "redact",
    "redis_client",
    "redis_failure",
    "redis_pool",
    "redis_tls_options",
]
