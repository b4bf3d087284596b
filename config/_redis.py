"""Redis connections: the URL forms we accept, and every client and pool the project opens.

Everything that talks to Redis gets its client or pool here, so how a URL becomes a connection
(TLS options today) is decided in one place.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis

from config.errors import ConfigurationError

SCHEMES = ("redis", "rediss", "unix")
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def check_redis_url(url: str) -> str:
    """Return ``url`` if it is a Redis URL we can connect with; else one clear error."""
    where = "SCRIPTPOOL_REDIS_URL"
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"{where} must be a URL such as redis://host:6379/0, got {url!r}", variable=where
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise ConfigurationError(f"{where} is not a valid URL: {exc}", variable=where) from None
    if parts.scheme not in SCHEMES:
        raise ConfigurationError(
            f"{where} must use one of {', '.join(s + '://' for s in SCHEMES)}, got {parts.scheme}://",
            variable=where,
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigurationError(f"{where} names no host: {url!r}", variable=where)
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ConfigurationError(f"{where} must end in a database number, got /{db}", variable=where)
    redis_tls_options(url)
    return url


def redis_tls_options(url: str) -> dict[str, Any] | None:
    """The TLS options of a ``rediss://`` URL for kombu's broker connection; None for ``redis://``.

    redis-py reads ``ssl_cert_reqs`` (default ``required``), ``ssl_ca_certs``, ``ssl_certfile`` and
    ``ssl_keyfile`` from the URL's query by itself. kombu does too when the query has them, but
    given a bare ``rediss://host`` it falls back to not verifying the server at all, so the job
    channel would trust any certificate while everything else checks it. Passing these options as
    Celery's ``broker_use_ssl`` makes kombu verify exactly as redis-py does.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = dict(parse_qsl(parts.query))
    wanted = query.get("ssl_cert_reqs", "required").lower()
    if wanted not in _CERT_REQS:
        raise ConfigurationError(
            f"ssl_cert_reqs in SCRIPTPOOL_REDIS_URL must be none, optional or required, got {wanted!r}"
        )
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[wanted]}
    options.update({name: query[name] for name in _TLS_FILES if name in query})
    return options


def redis_pool(url: str, *, timeout: float, connect_timeout: float) -> redis.ConnectionPool:
    """A connection pool for ``url``: for code that sends packed commands on its own connections."""
    return redis.ConnectionPool.from_url(url, socket_timeout=timeout, socket_connect_timeout=connect_timeout)


def redis_client(url: str, *, timeout: float, connect_timeout: float) -> redis.Redis:
    """A redis-py client for ``url`` with explicit timeouts (never redis-py's unbounded default)."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=connect_timeout)
