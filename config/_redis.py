"""Redis connections: the URL forms we accept, and every client and pool the project opens.

Everything that talks to Redis gets its client, pool or Celery broker settings here, so how a URL
becomes a connection (TLS, Sentinel, timeouts) is decided in one place.

Two kinds of URL:

* a direct one, ``redis://[:password@]host:6379/0``, ``rediss://...`` (TLS) or ``unix://...``,
  handed to redis-py as it is;
* a Sentinel one, ``sentinel://[[user]:password@]h1:26379,h2:26379,h3:26379/MASTER/DB?options``:
  the sentinels to ask, the name of the master they watch, and the database. Options (query):
  ``sentinel_password`` and ``sentinel_username`` (the sentinels' own credentials, if they have
  ``requirepass``), ``ssl=true`` (TLS on the sentinel links and the data links alike, with
  ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` and ``ssl_cert_reqs`` as for ``rediss://``),
  and ``min_other_sentinels`` (ignore a sentinel that sees fewer peers than this). The password
  before ``@`` is the data nodes' (``requirepass``/``masterauth``).

A connection to a Sentinel-managed primary asks the sentinels where the primary is whenever it
connects, so anything that reconnects after an error finds a promoted replica by itself.
Connections that never fail, because the old primary froze and came back still claiming to be
master, are the exception: :class:`PrimaryCheck` and the process-wide watch below catch those.
"""

from __future__ import annotations

import difflib
import os
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from scriptpool.config._logging import get_logger
from scriptpool.config.errors import ConfigurationError

log = get_logger("redis")

SCHEMES = ("redis", "rediss", "unix", "sentinel")
SENTINEL_PORT = 26379
DEFAULT_VARIABLE = "SCRIPTPOOL_REDIS_URL"
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_SENTINEL_OPTIONS = frozenset(
    {"sentinel_password", "sentinel_username", "ssl", "ssl_cert_reqs", "min_other_sentinels", *_TLS_FILES}
)
# The query options of a direct URL. redis-py hands any option it does not parse itself to its
# connection class as a keyword, so a typo (ssl_ca_cert) fails every command with a TypeError; and
# options kombu does not read would make the workers' broker connect otherwise than our clients.
# So a URL takes only these: the TLS files and checks, which both read (redis_tls_options), and
# on a unix:// URL the database (its path is the socket's).
_DIRECT_OPTIONS = {
    "redis": frozenset(),
    "rediss": frozenset({"ssl_cert_reqs", *_TLS_FILES}),
    "unix": frozenset({"db"}),
}
_TRUE, _FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})
# Sentinel links answer one small command each; a sentinel that takes longer than this is skipped
# for the next one, so a dead sentinel costs a caller at most this, once.
_SENTINEL_TIMEOUT_S = 0.5
# How often the primary watch asks the sentinels where each watched pool's primary is.
PRIMARY_CHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A parsed ``sentinel://`` URL (see the module docstring)."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    tls_cert_reqs: str = "required"
    tls_files: tuple[tuple[str, str], ...] = ()
    min_other_sentinels: int = 0

    def tls_options(self) -> dict[str, Any]:
        """redis-py's keyword arguments for TLS on a link (empty without TLS)."""
        if not self.tls:
            return {}
        return {"ssl": True, "ssl_cert_reqs": self.tls_cert_reqs, **dict(self.tls_files)}

    def describe(self) -> str:
        hosts = ",".join(f"{_host(h)}:{p}" for h, p in self.sentinels)
        return f"sentinel://{hosts}/{self.master_name}/{self.db}"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bad(variable: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"{variable} {problem}", variable=variable)


def parse_sentinel_url(url: str, variable: str = DEFAULT_VARIABLE) -> SentinelURL:
    """Parse ``sentinel://[[user]:password@]h1[:port],h2[:port]/MASTER[/DB][?options]``."""
    rest = url[len("sentinel://") :]
    rest, _, query = rest.partition("?")
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise _bad(variable, "must not have a #fragment")
    userinfo, at, hostpath = rest.rpartition("@")
    if not at:
        userinfo, hostpath = "", rest
    hostlist, _, path = hostpath.partition("/")
    sentinels = tuple(_parse_host(part, variable) for part in hostlist.split(","))
    segments = path.split("/") if path else []
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    if not segments or not segments[0]:
        raise _bad(
            variable,
            f"names no master: use sentinel://h1:26379,h2:26379,h3:26379/MASTER_NAME/DB, got {redact(url)!r}",
        )
    if len(segments) > 2:
        raise _bad(variable, f"has a path beyond /MASTER_NAME/DB: /{'/'.join(segments)}")
    master = unquote(segments[0])
    db_text = segments[1] if len(segments) == 2 else "0"
    if not db_text.isdigit():
        raise _bad(variable, f"must end in a database number, got /{db_text}")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        # As redis-py reads redis://user:password@: a bare name before @ is a user, not a password.
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - _SENTINEL_OPTIONS)
    if unknown:
        raise _bad(
            variable,
            f"has unknown sentinel option(s) {_named(unknown, _SENTINEL_OPTIONS)}; "
            f"known: {', '.join(sorted(_SENTINEL_OPTIONS))}",
        )
    tls_text = options.get("ssl", "false").lower()
    if tls_text not in _TRUE | _FALSE:
        raise _bad(variable, f"option ssl must be true or false, got {options['ssl']!r}")
    reqs = options.get("ssl_cert_reqs", "required").lower()
    if reqs not in _CERT_REQS:
        raise _bad(variable, f"option ssl_cert_reqs must be none, optional or required, got {reqs!r}")
    minimum = options.get("min_other_sentinels", "0")
    if not minimum.isdigit():
        raise _bad(variable, f"option min_other_sentinels must be a number, got {minimum!r}")
    return SentinelURL(
        sentinels=sentinels,
        master_name=master,
        db=int(db_text),
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
        tls=tls_text in _TRUE,
        tls_cert_reqs=reqs,
        tls_files=tuple((name, options[name]) for name in _TLS_FILES if name in options),
        min_other_sentinels=int(minimum),
    )


def _parse_host(text: str, variable: str) -> tuple[str, int]:
    text = text.strip()
    if not text:
        raise _bad(variable, "has an empty sentinel address (two commas, or none before the /)")
    if text.startswith("["):  # [::1]:26379
        host, _, after = text[1:].partition("]")
        port_text = after[1:] if after.startswith(":") else ""
        if after and not after.startswith(":"):
            raise _bad(variable, f"has a malformed sentinel address {text!r}")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise _bad(variable, f"has a sentinel address without a host: {text!r}")
    if port_text and not port_text.isdigit():
        raise _bad(variable, f"has a sentinel port that is not a number: {text!r}")
    port = int(port_text) if port_text else SENTINEL_PORT
    if not 0 < port < 65536:
        raise _bad(variable, f"has a sentinel port out of range: {text!r}")
    return host, port


def is_sentinel(url: str) -> bool:
    """True for a ``sentinel://`` URL."""
    return url.startswith("sentinel://")


def check_redis_url(url: str, variable: str = DEFAULT_VARIABLE) -> str:
    """Return ``url`` if it is a Redis URL we can connect with; else one clear error naming
    ``variable`` (the setting the URL came from)."""
    if not isinstance(url, str) or "://" not in url:
        raise _bad(variable, f"must be a URL such as redis://host:6379/0, got {redact(url)!r}")
    scheme = url.split("://", 1)[0]
    if scheme not in SCHEMES:
        raise _bad(variable, f"must use one of {', '.join(s + '://' for s in SCHEMES)}, got {scheme}://")
    if scheme == "sentinel":
        parse_sentinel_url(url, variable)
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise _bad(variable, f"is not a valid URL: {exc}") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise _bad(variable, f"names no host: {redact(url)!r}")
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise _bad(variable, f"must end in a database number, got /{db}")
    _check_direct_options(parts.scheme, parts.query, variable)
    redis_tls_options(url, variable)
    return url


def _check_direct_options(scheme: str, query: str, variable: str) -> None:
    """Refuse a query option a direct URL may not have (see ``_DIRECT_OPTIONS``), naming it,
    the closest valid one, and those the scheme takes."""
    known = _DIRECT_OPTIONS[scheme]
    given = [name for name, _ in parse_qsl(query, keep_blank_values=True)]
    unknown = sorted({name for name in given if name not in known})
    if not unknown:
        if "db" in given and not dict(parse_qsl(query))["db"].isdigit():
            raise _bad(variable, "option db must be a database number")
        return
    takes = (
        f"a {scheme}:// URL takes {', '.join(sorted(known))}" if known else f"a {scheme}:// URL takes none"
    )
    if scheme == "redis" and set(unknown) <= _DIRECT_OPTIONS["rediss"]:
        takes += " (the TLS options are for rediss://)"
    raise _bad(variable, f"has unknown option(s) {_named(unknown, known)}; {takes}")


def _named(unknown: list[str], known: frozenset[str]) -> str:
    """The unknown option names, each with the known one it most resembles (a typo, likely)."""
    shown = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.7)
        shown.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return ", ".join(shown)


def redact(url: str) -> str:
    """``url`` without its passwords, for messages and logs."""
    head, at, tail = url.rpartition("@")
    if at:
        # Without "://" (a malformed URL) everything before the "@" may be the password.
        scheme, separator, _ = head.partition("://")
        url = f"{scheme}://{tail}" if separator else f"***@{tail}"
    base, question, query = url.partition("?")
    if not question:
        return base
    pairs = [(k, "**" if "password" in k else v) for k, v in parse_qsl(query, keep_blank_values=True)]
    return base + "?" + "&".join(f"{k}={v}" for k, v in pairs)


def describe_redis_url(url: str) -> str:
    """Where ``url`` points, without credentials: ``host:6379/0``, or the sentinels and master."""
    if is_sentinel(url):
        try:
            return parse_sentinel_url(url).describe()
        except ConfigurationError:
            return redact(url)
    return redact(url).split("://", 1)[-1]


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


def redis_tls_options(url: str, variable: str = DEFAULT_VARIABLE) -> dict[str, Any] | None:
    """The TLS options of a ``rediss://`` (or ``sentinel://...?ssl=true``) URL for kombu's broker
    connection (Celery's ``broker_use_ssl``); None without TLS.

    redis-py reads ``ssl_cert_reqs`` (default ``required``), ``ssl_ca_certs``, ``ssl_certfile`` and
    ``ssl_keyfile`` from the URL's query by itself. kombu does too when the query has them, but
    given a bare ``rediss://host`` it falls back to not verifying the server at all, so the job
    channel would trust any certificate while everything else checks it. Passing these options as
    Celery's ``broker_use_ssl`` makes kombu verify exactly as redis-py does.
    """
    if is_sentinel(url):
        parsed = parse_sentinel_url(url, variable)
        if not parsed.tls:
            return None
        return {"ssl_cert_reqs": _CERT_REQS[parsed.tls_cert_reqs], **dict(parsed.tls_files)}
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = dict(parse_qsl(parts.query))
    wanted = query.get("ssl_cert_reqs", "required").lower()
    if wanted not in _CERT_REQS:
        raise _bad(variable, f"option ssl_cert_reqs must be none, optional or required, got {wanted!r}")
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[wanted]}
    options.update({name: query[name] for name in _TLS_FILES if name in query})
    return options


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
    _watch.add(pool)
    return pool


def redis_pool(url: str, *, timeout: float, connect_timeout: float) -> redis.ConnectionPool:
    """A connection pool for ``url``: for code that sends packed commands on its own connections.

    On a Sentinel pool, take connections with ``pool.get_connection()``, or call
    ``connection.connect()`` on one from ``pool.make_connection()`` before sending: only
    ``connect()`` asks the sentinels; a packed command on an unconnected connection dials the
    address it had before (measured: ``localhost:6379`` for a new one, the old primary after a
    failover).
    """
    if is_sentinel(url):
        return _sentinel_pool(url, timeout, connect_timeout)
    return redis.ConnectionPool.from_url(url, socket_timeout=timeout, socket_connect_timeout=connect_timeout)


def redis_client(url: str, *, timeout: float, connect_timeout: float) -> redis.Redis:
    """A redis-py client for ``url`` with explicit timeouts (never redis-py's unbounded default)."""
    return redis.Redis(connection_pool=redis_pool(url, timeout=timeout, connect_timeout=connect_timeout))


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
        f"sentinel://{auth}{_host(host)}:{port}/{parsed.db}" for host, port in parsed.sentinels
    )
    options.update(
        master_name=parsed.master_name,
        min_other_sentinels=parsed.min_other_sentinels,
        sentinel_kwargs=_sentinel_kwargs(parsed, connect_timeout),
        health_check_interval=2,
    )
    return config


# -- following the primary -------------------------------------------------------------------------


def primary_address(pool: redis.ConnectionPool) -> tuple[str, int] | None:
    """Where the sentinels say ``pool``'s primary is now; None for a direct pool, or when no
    sentinel names one (it is down and not yet replaced). Asking also closes the pool's idle
    connections if the primary moved, so they reconnect to the new one."""
    if not isinstance(pool, SentinelConnectionPool):
        return None
    try:
        address: tuple[str, int] = pool.get_master_address()  # type: ignore[no-untyped-call]
    except (redis.RedisError, OSError):
        return None
    return address


class PrimaryCheck:
    """For a long-lived connection (a subscription, a blocking reader): has Sentinel moved the
    primary away from it? Asks at most every ``every_s`` seconds; never for a direct pool.

    A connection whose primary froze and came back still answers, and the old node still says it
    is master until the sentinels convert it (about 10 s later, measured): without this check a
    subscriber hears nothing of what is published on the new primary in the meantime.
    """

    def __init__(self, pool: redis.ConnectionPool, every_s: float = PRIMARY_CHECK_S) -> None:
        self._pool = pool
        self._every_s = every_s
        self._next = time.monotonic() + every_s
        self.active = isinstance(pool, SentinelConnectionPool)

    def moved(self, connection: Any) -> bool:
        """True if the sentinels name a primary other than the one ``connection`` is on."""
        if not self.active or connection is None:
            return False
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._every_s
        address = primary_address(self._pool)
        here = (getattr(connection, "host", None), getattr(connection, "port", None))
        return address is not None and here[0] is not None and tuple(address) != here


class _PrimaryWatch:
    """Asks the sentinels every second where the primary of each Sentinel pool of this process
    is, so pooled connections left on a node that stopped being primary are closed (by redis-py,
    when the address changes) instead of writing into a node the sentinels will wipe. One
    question per Sentinel set and second, however many pools share it."""

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[SentinelConnectionPool] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = 0

    def add(self, pool: SentinelConnectionPool) -> None:
        with self._lock:
            self._pools.add(pool)
            if self._pid != os.getpid():  # first pool, or a forked child without the thread
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="scriptpool-primary-watch", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(PRIMARY_CHECK_S)
            with self._lock:
                pools = list(self._pools)
            named: dict[tuple[int, str], tuple[str, int] | None] = {}
            for pool in pools:
                key = (id(pool.sentinel_manager), pool.service_name)
                if key not in named:
                    try:
                        found = pool.sentinel_manager.discover_master(pool.service_name)
                        named[key] = (str(found[0]), int(found[1]))
                    except (redis.RedisError, OSError):
                        named[key] = None  # no sentinel names one now: leave the pools be
                address = named[key]
                before = pool.master_address
                if address is None or (before is not None and tuple(before) == address):
                    continue
                primary_address(pool)  # records the new address, closes idle connections
                if before is not None:
                    moved = f"{address[0]}:{address[1]}"
                    log.warning("redis_primary_moved", service=pool.service_name, primary=moved)


_watch = _PrimaryWatch()
