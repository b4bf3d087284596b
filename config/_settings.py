"""Typed settings, built once at the program's edge from the environment and passed explicitly."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from config import _environment
from config._groups import ShardGroup, parse_shard_groups, ranges_text
from config._keys import Keys
from config._limits import Limits
from config._redis import check_redis_url, is_sentinel
from config.errors import ConfigurationError

# A deploy waits this long for its replicas by default: loopback replicas acknowledge in 0.3 ms,
# and a replica across a data centre or busy writing its AOF in tens of ms; seconds mean the
# replica is not there, and the person deploying should hear so while still at the keyboard.
DEPLOY_WAIT_MS = 2000

_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.:{}]{0,63}")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable about scriptpool. Build with :meth:`from_env` at the edge.

    Each field is filled from one ``SCRIPTPOOL_*`` variable (``config.VARIABLES`` lists them).
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    shard_groups: str = ""
    # None: 1 on a sentinel:// group, 0 on a direct one (see deploy_replicas_for).
    deploy_replicas: int | None = None
    deploy_wait_ms: int = DEPLOY_WAIT_MS
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
    join_threads: int = 1
    metrics_port: int = 0
    # Captured runs (workers/_capture.py): the kill switch, and the store's bounds.
    capture: bool = True
    capture_per_shop: int = 50
    capture_max_bytes: int = 64 * 1024 * 1024
    capture_ttl_s: int = 3 * 24 * 3600
    # The parsed shard_groups (or one group on redis_url), derived by __post_init__.
    groups: tuple[ShardGroup, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_redis_url(self.redis_url)
        if self.shards >= 1:
            groups = parse_shard_groups(self.shard_groups, self.shards, self.redis_url)
            object.__setattr__(self, "groups", groups)
        if self.deploy_replicas is not None and self.deploy_replicas < 0:
            _invalid("deploy_replicas", f"must be 0 or more (or auto), got {self.deploy_replicas}")
        if not 0 < self.deploy_wait_ms <= 600_000:
            _invalid("deploy_wait_ms", f"must lie in 1..600000 ms, got {self.deploy_wait_ms}")
        if not _PREFIX.fullmatch(self.key_prefix):
            _invalid("key_prefix", f"must be 1-64 letters, digits or _-.:{{}}, got {self.key_prefix!r}")
        if self.shards < 1:
            _invalid("shards", f"must be at least 1, got {self.shards}")
        if not 0.0 <= self.input_validation_rate <= 1.0:
            _invalid("input_validation_rate", f"must lie in [0, 1], got {self.input_validation_rate}")
        for name in (
            "default_deadline_ms",
            "module_cache_bytes",
            "provider_max_bytes",
            "epoch_tick_ms",
            "join_threads",
            "capture_per_shop",
            "capture_max_bytes",
            "capture_ttl_s",
        ):
            if getattr(self, name) <= 0:
                _invalid(name, f"must be positive, got {getattr(self, name)}")
        if not self.binding_cache_ttl_s > 0:
            _invalid("binding_cache_ttl_s", f"must be positive, got {self.binding_cache_ttl_s}")
        if not 0 <= self.metrics_port <= 65535:
            _invalid("metrics_port", f"must be a TCP port in 0..65535, got {self.metrics_port}")

    @property
    def keys(self) -> Keys:
        """Redis key names under this deployment's prefix."""
        return Keys(self.key_prefix)

    def group_of(self, shard: int) -> ShardGroup:
        """The group that serves ``shard``."""
        for group in self.groups:
            if shard in group.shards:
                return group
        raise ConfigurationError(f"shard {shard} is not one of 0..{self.shards - 1}")

    def group_of_shards(self, shards: Iterable[int]) -> ShardGroup:
        """The one group serving all of ``shards``; a worker's shards must share their Redis."""
        chosen = sorted(set(shards))
        found = {self.group_of(shard) for shard in chosen}
        if len(found) != 1:
            spread = "; ".join(
                f"{ranges_text([s for s in chosen if s in g.shards])} in {g.describe()}"
                for g in sorted(found, key=lambda g: g.shards[0])
            )
            raise ConfigurationError(
                f"a worker's shards must all be in one group of SCRIPTPOOL_SHARD_GROUPS, got {spread}: "
                "start one worker per group",
                variable="SCRIPTPOOL_SHARD_GROUPS",
            )
        return found.pop()

    def for_group(self, group: ShardGroup) -> Settings:
        """These settings for a process that serves only ``group`` (a worker): its Redis,
        ``redis_url``, is the group's."""
        return self.replace(redis_url=group.url)

    def deploy_replicas_for(self, url: str) -> int:
        """How many replicas must acknowledge a deploy to the Redis at ``url``: the setting, or by
        default 1 behind Sentinel (a Sentinel set exists to survive losing its primary, and a
        deploy only the primary has is lost by exactly that failover) and 0 on a direct URL (a
        lone Redis has no replica to wait for; AOF is what keeps its deploys)."""
        if self.deploy_replicas is not None:
            return self.deploy_replicas
        return 1 if is_sentinel(url) else 0

    def require_artifact_key(self) -> bytes:
        """Return the HMAC key for AOT artifacts, or fail clearly if none is configured."""
        if len(self.artifact_key) < 16:
            raise ConfigurationError(
                "SCRIPTPOOL_ARTIFACT_KEY must be set to at least 16 bytes: it signs compiled artifacts",
                variable="SCRIPTPOOL_ARTIFACT_KEY",
            )
        return self.artifact_key

    def replace(self, **changes: object) -> Settings:
        """Return a copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``SCRIPTPOOL_*`` variables (``os.environ`` by default).

        A malformed or out-of-range value raises :class:`ConfigurationError` naming its variable.
        """
        fields, limits = _environment.read(os.environ if environ is None else environ)
        try:
            return cls(limits=Limits(**limits), **fields)
        except ConfigurationError as exc:
            limit, name = exc.detail.get("limit"), exc.detail.get("field")
            variable = _environment.BY_FIELD.get(f"limits.{limit}" if limit else str(name))
            if variable is None:
                raise
            raise ConfigurationError(f"{variable.name}: {exc.message}", variable=variable.name) from None

    def to_env(self) -> dict[str, str]:
        """The ``SCRIPTPOOL_*`` variables that rebuild these settings in another process."""
        values = self.field_values()
        return {v.name: v.render(values[v.field]) for v in _environment.VARIABLES}

    def field_values(self) -> dict[str, Any]:
        """Every field by its ``config.VARIABLES`` name (``limits.fuel`` for a limit)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        values.update({f"limits.{k}": v for k, v in self.limits.as_dict().items()})
        return values


def _invalid(name: str, problem: str) -> None:
    raise ConfigurationError(f"{name} {problem}", field=name)
