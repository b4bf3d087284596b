"""Redis URLs: the forms we accept, how each is checked, shown without credentials, and its TLS.

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

Pure text work: nothing here opens a connection (``_clients`` does, from what this parses).
"""

from __future__ import annotations

import difflib
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from scriptpool.config.errors import ConfigurationError

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
        hosts = ",".join(f"{bracketed_host(h)}:{p}" for h, p in self.sentinels)
        return f"sentinel://{hosts}/{self.master_name}/{self.db}"


def bracketed_host(host: str) -> str:
    """``host`` as it goes before ``:port`` in a URL (an IPv6 address in brackets)."""
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
