"""Every client and pool the project opens, Celery's broker settings, and what a failure means.

Everything that talks to Redis gets its client, pool or Celery broker settings here, so how a URL
(``_urls``) becomes a connection (TLS, Sentinel, timeouts) is decided in one place.

A connection to a Sentinel-managed primary asks the sentinels where the primary is whenever it
connects, so anything that reconnects after an error finds a promoted replica by itself.
Connections that never fail, because the old primary froze and came back still claiming to be
master, are the exception: ``_primary`` catches those.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from scriptpool.config.redis._primary import watch_primary
from scriptpool.config.redis._urls import (
    SentinelURL,
    bracketed_host,
    is_sentinel,
    parse_sentinel_url,
    redis_tls_options,
)

# Sentinel links answer one small command each; a sentinel that takes longer than this is skipped
# for the next one, so a dead sentinel costs a caller at most this, once.
_SENTINEL_TIMEOUT_S = 0.5


# -- Sentinel ------------------------------------------------------------------------------------

_managers: dict[tuple[str, float, float], Sentinel] = {}
_managers_lock = threading.Lock()


def _sentinel_kwargs(parsed: SentinelURL, connect_timeout: float) -> dict[str, Any]:
    # Given sentinel_kwargs, redis-py uses them *instead of* the socket options of the data links,
    # so the sentinel links need their own timeouts, or a silent sentinel hangs a connect forever.
    # And no retries: a sentinel client is a plain redis.Redis, which retries a failed command 10
    # times with backoff (measured: a wrong sentinel password took 11.7 s to report, 3 sentinels
    # each retried for about 4 s); asking the next sentinel is the retry.
    kwargs: dict[str, Any] = {
        "socket_timeout": _SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": min(connect_timeout, _SENTINEL_TIMEOUT_S),
        "retry": Retry(NoBackoff(), 0),
        **parsed.tls_options(),
    }
    if parsed.sentinel_password is not None:
        kwargs["password"] = parsed.sentinel_password
    if parsed.sentinel_username is not None:
        kwargs["username"] = parsed.sentinel_username
    return kwargs


def _manager(url: str, parsed: SentinelURL, timeout: float, connect_timeout: float) -> Sentinel:
    """One ``Sentinel`` per URL and timeouts in a process: its links to the sentinels are shared
    by every pool taken from it, rather than opened again by each reconnecting session."""
    key = (url, timeout, connect_timeout)
    with _managers_lock:
        manager = _managers.get(key)
        if manager is None:
            manager = _managers[key] = Sentinel(
                list(parsed.sentinels),
                min_other_sentinels=parsed.min_other_sentinels,
                sentinel_kwargs=_sentinel_kwargs(parsed, connect_timeout),
                socket_timeout=timeout,
                socket_connect_timeout=connect_timeout,
            )
        return manager


def _sentinel_pool(
    url: str, timeout: float, connect_timeout: float, **pool_kwargs: Any
) -> SentinelConnectionPool:
    parsed = parse_sentinel_url(url)
    manager = _manager(url, parsed, timeout, connect_timeout)
    master_kwargs: dict[str, Any] = {"db": parsed.db, **parsed.tls_options(), **pool_kwargs}
    if parsed.password is not None:
        master_kwargs["password"] = parsed.password
    if parsed.username is not None:
        master_kwargs["username"] = parsed.username
    client = manager.master_for(parsed.master_name, **master_kwargs)
    pool: SentinelConnectionPool = client.connection_pool
    watch_primary(pool)
    return pool


def redis_pool(
    url: str, *, timeout: float, connect_timeout: float, retry: bool = True
) -> redis.ConnectionPool:
    """A connection pool for ``url``: for code that sends packed commands on its own connections.

    On a Sentinel pool, take connections with ``pool.get_connection()``, or call
    ``connection.connect()`` on one from ``pool.make_connection()`` before sending: only
    ``connect()`` asks the sentinels; a packed command on an unconnected connection dials the
    address it had before (measured: ``localhost:6379`` for a new one, the old primary after a
    failover).
    """
    # redis-py retries a failed command with backoff by default (3.7 s measured against a dead
    # Redis): ``retry=False`` is for callers whose answer is worthless that late.
    extra: dict[str, Any] = {} if retry else {"retry": Retry(NoBackoff(), 0)}
    if is_sentinel(url):
        return _sentinel_pool(url, timeout, connect_timeout, **extra)
    return redis.ConnectionPool.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=connect_timeout, **extra
    )


def redis_client(url: str, *, timeout: float, connect_timeout: float, retry: bool = True) -> redis.Redis:
    """A redis-py client for ``url`` with explicit timeouts (never redis-py's unbounded default);
    ``retry=False``: a failed command fails at once (see :func:`redis_pool`)."""
    return redis.Redis(
        connection_pool=redis_pool(url, timeout=timeout, connect_timeout=connect_timeout, retry=retry)
    )


class WriteSession:
    """A client for writes that must be durable: every command, pipeline and script of
    ``client`` runs on one connection, opened now, and :meth:`confirm` then waits until replicas
    have all of them.

    ``WAIT`` counts the writes of its own connection, so everything must go over one (a pool of
    one connection; a single-connection redis-py client would still run pipelines elsewhere). If
    that connection had to be re-established in between (the primary restarted or failed over
    while we wrote), earlier writes may be gone and ``WAIT`` would answer only for the later ones:
    :meth:`confirm` refuses to vouch for them. For one task in one thread; then :meth:`close`.
    """

    def __init__(self, url: str, *, timeout: float, connect_timeout: float) -> None:
        if is_sentinel(url):
            pool: redis.ConnectionPool = _sentinel_pool(url, timeout, connect_timeout, max_connections=1)
        else:
            pool = redis.ConnectionPool.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=connect_timeout, max_connections=1
            )
        self.client = redis.Redis(connection_pool=pool)
        self.reconnected = False
        connection = pool.get_connection()  # connects (on Sentinel: asks where the primary is)
        try:
            connection.register_connect_callback(self._connected_again)  # type: ignore[no-untyped-call]
        finally:
            pool.release(connection)

    def _connected_again(self, _connection: Any) -> None:
        self.reconnected = True

    def confirm(self, replicas: int, timeout_ms: int) -> int:
        """Block until ``replicas`` replicas acknowledged every write of this session, or
        ``timeout_ms`` pass; return how many did (``WAIT``). Raises ``redis.ConnectionError`` if the
        connection was re-established during the session.

        ``WAIT`` is refused inside Lua on Redis 7.0 and does not block inside MULTI, which is why
        durable writes are followed by this call rather than making it themselves.
        """
        if replicas <= 0:
            return 0
        if timeout_ms <= 0:
            raise ValueError("a WAIT of 0 ms blocks forever")
        if self.reconnected:
            raise redis.ConnectionError("the connection was re-established during the writes")
        acknowledged = int(self.client.execute_command("WAIT", replicas, timeout_ms))  # type: ignore[no-untyped-call]
        if self.reconnected:  # the WAIT itself ran on a new connection
            raise redis.ConnectionError("the connection was re-established during the writes")
        return acknowledged

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()


def celery_broker(url: str, *, timeout: float, connect_timeout: float) -> dict[str, Any]:
    """Celery settings that connect its broker to ``url`` as our own clients connect:
    ``broker_url``, ``broker_use_ssl``, ``broker_channel_error_retry`` and the connection part of
    ``broker_transport_options`` (the caller adds its own options to the latter).

    For Sentinel, kombu's transport (``sentinel://`` alternates, one per sentinel, each carrying the
    data password and database; the master name and the sentinels' credentials, timeouts and TLS
    in ``sentinel_kwargs``; TLS on the data links in ``broker_use_ssl``: both are needed, either
    alone fails). ``health_check_interval`` 2 makes kombu drop a BRPOP that a frozen primary
    never answers after 1 + 2 s rather than 1 + 25 (measured: the worker consumed again 4.7 s
    after a 10 s freeze, 17.5 s with the default). ``broker_channel_error_retry`` lets the
    consumer reconnect after a ``ResponseError`` (``READONLY``, ``NOREPLICAS``, ``UNBLOCKED``) from a
    demoted primary instead of exiting.
    """
    options: dict[str, Any] = {"socket_connect_timeout": connect_timeout, "socket_timeout": timeout}
    config: dict[str, Any] = {
        "broker_url": url,
        "broker_use_ssl": redis_tls_options(url),
        "broker_channel_error_retry": True,
        "broker_transport_options": options,
    }
    if not is_sentinel(url):
        return config
    parsed = parse_sentinel_url(url)
    auth = ""
    if parsed.password is not None or parsed.username is not None:
        auth = f"{quote(parsed.username or '', safe='')}:{quote(parsed.password or '', safe='')}@"
    # Every alternate must say sentinel:// (kombu drops the others silently), and the credentials
    # and database are read from the first.
    config["broker_url"] = ";".join(
        f"sentinel://{auth}{bracketed_host(host)}:{port}/{parsed.db}" for host, port in parsed.sentinels
    )
    options.update(
        master_name=parsed.master_name,
        min_other_sentinels=parsed.min_other_sentinels,
        sentinel_kwargs=_sentinel_kwargs(parsed, connect_timeout),
        health_check_interval=2,
    )
    return config


def redis_failure(where: str, exc: BaseException) -> str:
    """What a failure to use a Redis means to a user; ``where`` says which, credentials left out
    ("at host:6379/0", "of group 0-3 (host:6379/0)"). A Redis that wants a password, or another
    one, was reached: it is said so, with where the password goes, not "cannot reach"."""
    if isinstance(exc, redis.AuthenticationError):
        return (
            f"Redis {where} answered but refused the connection ({exc}): it needs its password "
            "in the URL, as redis://:PASSWORD@host:6379/0 (redis://USER:PASSWORD@host:6379/0 for an "
            "ACL user)"
        )
    return f"cannot reach Redis {where}: {exc}"
