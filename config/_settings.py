"""Typed settings, built once at the program's edge from the environment and passed explicitly."""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from config._keys import Keys
from config._limits import Limits
from config.errors import ConfigurationError

# Every variable Settings.from_env reads, with what it sets. The README table and the compose
# consistency test are checked against this list.
ENVIRONMENT: dict[str, str] = {
    "SCRIPTPOOL_REDIS_URL": "Redis URL (redis://, rediss:// for TLS; password in the URL)",
    "SCRIPTPOOL_ARTIFACT_KEY": "HMAC key (16+ bytes) that signs AOT artifacts; required to deploy or run",
    "SCRIPTPOOL_SHARDS": "number of shards (default 2); every process must agree",
    "SCRIPTPOOL_KEY_PREFIX": "prefix of every Redis key and queue (default sp)",
    "SCRIPTPOOL_DEADLINE_MS": "default caller deadline in ms (default 50)",
    "SCRIPTPOOL_MODULE_CACHE_MB": "compiled-module cache per worker process, MiB (default 256)",
    "SCRIPTPOOL_PROVIDER_MAX_KB": "size cap of provider modules, KiB (default 16384)",
    "SCRIPTPOOL_INPUT_VALIDATION_RATE": "share of inputs validated against the EP schema (default 0.05)",
    "SCRIPTPOOL_EPOCH_TICK_MS": "epoch ticker period: wall-clock limit granularity (default 5)",
    "SCRIPTPOOL_BINDING_CACHE_TTL_S": "backstop expiry of cached bindings besides pub/sub (default 5)",
    "SCRIPTPOOL_METRICS_PORT": "worker Prometheus /metrics port (default 0: off)",
    "SCRIPTPOOL_LIMIT_FUEL": "default instruction budget (11,000,000)",
    "SCRIPTPOOL_LIMIT_MEMORY_BYTES": "default linear memory limit (10,240,000)",
    "SCRIPTPOOL_LIMIT_STACK_BYTES": "default Wasm stack (524,288)",
    "SCRIPTPOOL_LIMIT_INPUT_BYTES": "default input limit (131,072)",
    "SCRIPTPOOL_LIMIT_OUTPUT_BYTES": "default output limit (20,480)",
    "SCRIPTPOOL_LIMIT_LOG_BYTES": "default log limit before truncation (1,024)",
    "SCRIPTPOOL_LIMIT_MODULE_BYTES": "default module size cap (262,144)",
    "SCRIPTPOOL_LIMIT_WALL_MS": "default wall-clock limit per run (100)",
}

_LIMIT_ENV = {
    "SCRIPTPOOL_LIMIT_FUEL": "fuel",
    "SCRIPTPOOL_LIMIT_MEMORY_BYTES": "memory_bytes",
    "SCRIPTPOOL_LIMIT_STACK_BYTES": "stack_bytes",
    "SCRIPTPOOL_LIMIT_INPUT_BYTES": "input_bytes",
    "SCRIPTPOOL_LIMIT_OUTPUT_BYTES": "output_bytes",
    "SCRIPTPOOL_LIMIT_LOG_BYTES": "log_bytes",
    "SCRIPTPOOL_LIMIT_MODULE_BYTES": "module_bytes",
    "SCRIPTPOOL_LIMIT_WALL_MS": "wall_ms",
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable about scriptpool. Build with :meth:`from_env` at the edge."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    artifact_key: bytes = b""
    shards: int = 2
    key_prefix: str = "sp"
    default_deadline_ms: int = 50
    limits: Limits = field(default_factory=Limits)
    module_cache_bytes: int = 256 * 1024 * 1024
    provider_max_bytes: int = 16 * 1024 * 1024
    input_validation_rate: float = 0.05
    epoch_tick_ms: int = 5
    binding_cache_ttl_s: float = 5.0
    metrics_port: int = 0

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ConfigurationError(f"shards must be at least 1, got {self.shards}")
        if not 0.0 <= self.input_validation_rate <= 1.0:
            raise ConfigurationError("input_validation_rate must lie in [0, 1]")
        for name in ("default_deadline_ms", "module_cache_bytes", "provider_max_bytes", "epoch_tick_ms"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be positive")

    @property
    def keys(self) -> Keys:
        """Redis key names under this deployment's prefix."""
        return Keys(self.key_prefix)

    def require_artifact_key(self) -> bytes:
        """Return the HMAC key for AOT artifacts, or fail clearly if none is configured."""
        if len(self.artifact_key) < 16:
            raise ConfigurationError(
                "SCRIPTPOOL_ARTIFACT_KEY must be set to at least 16 bytes: it signs compiled artifacts"
            )
        return self.artifact_key

    def replace(self, **changes: object) -> Settings:
        """Return a copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``SCRIPTPOOL_*`` variables (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        defaults = cls()
        try:
            limit_overrides = {name: int(env[var]) for var, name in _LIMIT_ENV.items() if var in env}
            return cls(
                redis_url=env.get("SCRIPTPOOL_REDIS_URL", defaults.redis_url),
                artifact_key=env.get("SCRIPTPOOL_ARTIFACT_KEY", "").encode(),
                shards=int(env.get("SCRIPTPOOL_SHARDS", defaults.shards)),
                key_prefix=env.get("SCRIPTPOOL_KEY_PREFIX", defaults.key_prefix),
                default_deadline_ms=int(env.get("SCRIPTPOOL_DEADLINE_MS", defaults.default_deadline_ms)),
                limits=Limits().with_overrides(limit_overrides),
                module_cache_bytes=int(
                    env.get("SCRIPTPOOL_MODULE_CACHE_MB", defaults.module_cache_bytes // 2**20)
                )
                * 2**20,
                provider_max_bytes=int(
                    env.get("SCRIPTPOOL_PROVIDER_MAX_KB", defaults.provider_max_bytes // 1024)
                )
                * 1024,
                input_validation_rate=float(
                    env.get("SCRIPTPOOL_INPUT_VALIDATION_RATE", defaults.input_validation_rate)
                ),
                epoch_tick_ms=int(env.get("SCRIPTPOOL_EPOCH_TICK_MS", defaults.epoch_tick_ms)),
                binding_cache_ttl_s=float(
                    env.get("SCRIPTPOOL_BINDING_CACHE_TTL_S", defaults.binding_cache_ttl_s)
                ),
                metrics_port=int(env.get("SCRIPTPOOL_METRICS_PORT", defaults.metrics_port)),
            )
        except ValueError as exc:
            raise ConfigurationError(f"malformed SCRIPTPOOL_* setting: {exc}") from exc


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


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
