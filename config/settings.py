"""Typed settings, built once at the program's edge from the environment and passed explicitly.

Public as ``scriptpool.config.settings`` for the artifact key's checks (:func:`read_key_file`,
:func:`artifact_key_problem`, :func:`check_artifact_key`, :data:`PUBLISHED_ARTIFACT_KEYS`) and
:data:`MAX_SHARDS`, which only the command-line tool and tests need; :class:`Settings` is also a
name of ``scriptpool.config``.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scriptpool.config import environment
from scriptpool.config._keys import Keys
from scriptpool.config.errors import ConfigurationError
from scriptpool.config.groups import ShardGroup, parse_shard_groups, ranges_text
from scriptpool.config.limits import Limits
from scriptpool.config.redis import check_redis_url, is_sentinel

__all__ = [
    "MAX_SHARDS",
    "PUBLISHED_ARTIFACT_KEYS",
    "Settings",
    "artifact_key_problem",
    "check_artifact_key",
    "read_key_file",
]

# A deploy waits this long for its replicas by default: loopback replicas acknowledge in 0.3 ms,
# and a replica across a data centre or busy writing its AOF in tens of ms; seconds mean the
# replica is not there, and the person deploying should hear so while still at the keyboard.
DEPLOY_WAIT_MS = 2000

_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.:{}]{0,63}")

# The most shards a deployment may have. Every process keeps something per shard (a client a lane,
# `status` a row and a queue-depth read), so the count must stay within reach of a person: far
# past any pool measured here (16), and 999999999 (a typo of a digit key held down) is refused at
# once instead of making `status` run for minutes.
MAX_SHARDS = 4096
# A caller's deadline as the client takes it: (0, 600 s] (scriptpool.producer._client.MAX_TIMEOUT_S).
MAX_DEADLINE_MS = 600_000
# The epoch ticker's period is the wall-clock limit's granularity: past a second it no longer
# bounds a run's wall time in any useful way (wall_ms is 100 ms by default).
MAX_EPOCH_TICK_MS = 1000
# Threads a worker runs one join's scripts on: a join has at most 25 apps and a reducer.
MAX_JOIN_THREADS = 64
# The Settings fields that hold numbers, with the types each takes (bool is never one of them).
_INTEGERS = (
    "deploy_wait_ms", "shards", "default_deadline_ms", "module_cache_bytes", "provider_max_bytes",
    "epoch_tick_ms", "join_threads", "metrics_port", "capture_per_shop", "capture_max_bytes",
    "capture_ttl_s", "usage_retention_s",
)  # fmt: skip
_NUMBERS = ("input_validation_rate", "binding_cache_ttl_s", "usage_flush_s")
# Usage counts are kept per minute: at least one minute, at most a year of them. A worker sends
# its counts at most a minute apart (a SIGKILL loses what it had not sent), at most 10 times a second.
MAX_USAGE_RETENTION_S = 366 * 24 * 3600
USAGE_FLUSH_RANGE_S = (0.1, 60.0)

# The artifact key signs the native code workers load: whoever has it and can write to Redis runs
# code on every worker. So a key must be long, look random, and never be one that was published.
MIN_ARTIFACT_KEY_BYTES = 32
# Fewer distinct bytes than this is a placeholder ("xxxx...", "0000..."), not a random key; 64 hex
# digits from `scriptpool key generate` have 16 (fewer than 8 with odds below 10^-40).
MIN_ARTIFACT_KEY_DISTINCT = 8
# A key file holds one key; anything longer is not one (and is not read whole).
MAX_ARTIFACT_KEY_FILE_BYTES = 4096
# SHA-256 of keys that appeared in this repository's files or docs, refused wherever they are set:
# the key docker-compose.yml shipped (`change-me-to-32-...`). Shorter published keys (the tests'
# and benches' old literals, an early README's) are refused by length already.
PUBLISHED_ARTIFACT_KEYS = frozenset(
    {
        "50973d908ee8925d8c284ac1a639e3e029a7711a1f43916b59a434fc51422af8",
    }
)
KEY_HOWTO = (
    "make one with `scriptpool key generate` (or `python -c 'import secrets; print(secrets.token_hex(32))'`) "
    "and put it in SCRIPTPOOL_ARTIFACT_KEY, or in a file named by SCRIPTPOOL_ARTIFACT_KEY_FILE "
    "(`scriptpool key generate --file PATH` writes one)"
)


def artifact_key_problem(key: bytes) -> str | None:
    """Why ``key`` may not sign artifacts (a phrase: "is 16 bytes: ..."), or None if it may."""
    if not key:
        return "is not set: workers and deploys need the key that signs compiled artifacts"
    if len(key) < MIN_ARTIFACT_KEY_BYTES:
        return f"is {len(key)} bytes: a key has at least {MIN_ARTIFACT_KEY_BYTES}"
    if any(byte < 0x20 or byte == 0x7F for byte in key):
        # HMAC pads a key to its block with NULs, so a published key with NULs after it signs
        # as that key: a key is printable text, as `scriptpool key generate` makes it.
        return "has control characters (a NUL or a newline, say): a key is printable text"
    if hashlib.sha256(key).hexdigest() in PUBLISHED_ARTIFACT_KEYS:
        return "is a published key (scriptpool's own files showed it), so anyone can sign artifacts with it"
    if b"change-me" in key.lower() or b"changeme" in key.lower():
        return "is a placeholder (it says change-me), not a random key"
    if len(set(key)) < MIN_ARTIFACT_KEY_DISTINCT:
        return f"has only {len(set(key))} distinct bytes: a placeholder, not a random key"
    return None


def check_artifact_key(key: bytes, source: str = "SCRIPTPOOL_ARTIFACT_KEY") -> bytes:
    """``key`` if it may sign artifacts, else :class:`ConfigurationError` naming ``source`` (the
    variable it came from) and saying how to make a good one."""
    problem = artifact_key_problem(key)
    if problem is not None:
        raise ConfigurationError(f"{source} {problem}; {KEY_HOWTO}", variable=source)
    return key


def read_key_file(path: str) -> bytes:
    """The key in the file at ``path`` (surrounding whitespace, a final newline say, stripped),
    or :class:`ConfigurationError` naming SCRIPTPOOL_ARTIFACT_KEY_FILE."""
    variable = "SCRIPTPOOL_ARTIFACT_KEY_FILE"
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_ARTIFACT_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(
            f"{variable} names {path}, which cannot be read ({exc.strerror or exc}); "
            f"`scriptpool key generate --file {path}` writes a new key there",
            variable=variable,
        ) from None
    if len(data) > MAX_ARTIFACT_KEY_FILE_BYTES:
        raise ConfigurationError(
            f"{variable} names {path}, which holds more than {MAX_ARTIFACT_KEY_FILE_BYTES} bytes: "
            "not a key file (`scriptpool key generate --file PATH` writes one)",
            variable=variable,
        )
    return data.strip()


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable about scriptpool. Build with :meth:`from_env` at the edge.

    Each field is filled from one ``SCRIPTPOOL_*`` variable
    (``scriptpool.config.environment.VARIABLES`` lists them).
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    shard_groups: str = ""
    # None: 1 on a sentinel:// group, 0 on a direct one (see deploy_replicas_for).
    deploy_replicas: int | None = None
    deploy_wait_ms: int = DEPLOY_WAIT_MS
    artifact_key: bytes = b""
    artifact_key_file: str = ""  # read when artifact_key is empty (SCRIPTPOOL_ARTIFACT_KEY_FILE)
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
    # Usage accounting (scriptpool.config.usage): how long per-minute counts are kept, and how
    # often a worker sends what it counted.
    usage_retention_s: int = 7 * 24 * 3600
    usage_flush_s: float = 2.0
    # Traces (README "Traces"): a worker that traces records a failed run's spans even when the
    # caller's sampling decision was not to.
    trace_failures: bool = False
    # The parsed shard_groups (or one group on redis_url), derived by __post_init__.
    groups: tuple[ShardGroup, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Types first: a value from code (not from the environment, which parses its text) could
        # be anything, and must fail here by name rather than in a comparison or at first use.
        for name in _INTEGERS:
            if type(getattr(self, name)) is not int:
                _invalid(name, f"must be an integer, got {getattr(self, name)!r}")
        for name in _NUMBERS:
            if type(getattr(self, name)) not in (int, float):
                _invalid(name, f"must be a number, got {getattr(self, name)!r}")
        if self.deploy_replicas is not None and type(self.deploy_replicas) is not int:
            _invalid("deploy_replicas", f"must be an integer (or None: auto), got {self.deploy_replicas!r}")
        for name in ("redis_url", "shard_groups", "key_prefix", "artifact_key_file"):
            if not isinstance(getattr(self, name), str):
                _invalid(name, f"must be text, got {type(getattr(self, name)).__name__}")
        for name in ("capture", "trace_failures"):
            if type(getattr(self, name)) is not bool:
                _invalid(name, f"must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.artifact_key, bytes):
            _invalid("artifact_key", f"must be bytes, got {type(self.artifact_key).__name__}")
        if not isinstance(self.limits, Limits):
            _invalid("limits", f"must be a Limits, got {type(self.limits).__name__}")
        if not 1 <= self.shards <= MAX_SHARDS:
            # Before the groups: their map is checked against every shard.
            _invalid("shards", f"must be at least 1 and at most {MAX_SHARDS}, got {self.shards}")
        check_redis_url(self.redis_url)
        object.__setattr__(self, "groups", parse_shard_groups(self.shard_groups, self.shards, self.redis_url))
        if self.deploy_replicas is not None and self.deploy_replicas < 0:
            _invalid("deploy_replicas", f"must be 0 or more (or auto), got {self.deploy_replicas}")
        if not 0 < self.deploy_wait_ms <= 600_000:
            _invalid("deploy_wait_ms", f"must lie in 1..600000 ms, got {self.deploy_wait_ms}")
        if not _PREFIX.fullmatch(self.key_prefix):
            _invalid("key_prefix", f"must be 1-64 letters, digits or _-.:{{}}, got {self.key_prefix!r}")
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
        if self.default_deadline_ms > MAX_DEADLINE_MS:
            _invalid(
                "default_deadline_ms", f"must lie in 1..{MAX_DEADLINE_MS} ms, got {self.default_deadline_ms}"
            )
        if self.epoch_tick_ms > MAX_EPOCH_TICK_MS:
            _invalid("epoch_tick_ms", f"must lie in 1..{MAX_EPOCH_TICK_MS} ms, got {self.epoch_tick_ms}")
        if self.join_threads > MAX_JOIN_THREADS:
            _invalid("join_threads", f"must lie in 1..{MAX_JOIN_THREADS}, got {self.join_threads}")
        if not 0 < self.binding_cache_ttl_s < math.inf:  # inf would turn the backstop off
            ttl = self.binding_cache_ttl_s
            _invalid("binding_cache_ttl_s", f"must be a positive number of seconds, got {ttl}")
        if not 60 <= self.usage_retention_s <= MAX_USAGE_RETENTION_S:
            retention = self.usage_retention_s
            _invalid("usage_retention_s", f"must lie in 60..{MAX_USAGE_RETENTION_S} s, got {retention}")
        low, high = USAGE_FLUSH_RANGE_S
        if not low <= self.usage_flush_s <= high:  # NaN fails this too
            _invalid("usage_flush_s", f"must lie in {low}..{high} s, got {self.usage_flush_s}")
        if not 0 <= self.metrics_port <= 65535:
            _invalid("metrics_port", f"must be a TCP port in 0..65535, got {self.metrics_port}")

    @property
    def keys(self) -> Keys:
        """Redis key names under this deployment's prefix."""
        return Keys(self.key_prefix)

    def group_of(self, shard: int) -> ShardGroup:
        """The group that serves ``shard``."""
        for group in self.groups:
            # A group's shards are sorted: a search, not a scan (a client asks for every shard).
            at = bisect.bisect_left(group.shards, shard)
            if at < len(group.shards) and group.shards[at] == shard:
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
        """Return the HMAC key for AOT artifacts (``artifact_key``, else the one in
        ``artifact_key_file``, read now), or :class:`ConfigurationError` if there is none, or it
        is short, a placeholder or a published one; the message says how to make one."""
        if self.artifact_key or not self.artifact_key_file:
            return check_artifact_key(self.artifact_key)
        return check_artifact_key(read_key_file(self.artifact_key_file), "SCRIPTPOOL_ARTIFACT_KEY_FILE")

    def replace(self, **changes: object) -> Settings:
        """Return a copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``SCRIPTPOOL_*`` variables (``os.environ`` by default).

        A malformed or out-of-range value raises :class:`ConfigurationError` naming its variable.
        """
        fields, limits = environment.read(os.environ if environ is None else environ)
        if fields.get("artifact_key") and fields.get("artifact_key_file"):
            raise ConfigurationError(
                "SCRIPTPOOL_ARTIFACT_KEY and SCRIPTPOOL_ARTIFACT_KEY_FILE are both set: set one",
                variable="SCRIPTPOOL_ARTIFACT_KEY_FILE",
            )
        try:
            return cls(limits=Limits(**limits), **fields)
        except ConfigurationError as exc:
            limit, name = exc.detail.get("limit"), exc.detail.get("field")
            variable = environment.BY_FIELD.get(f"limits.{limit}" if limit else str(name))
            if variable is None:
                raise
            raise ConfigurationError(f"{variable.name}: {exc.message}", variable=variable.name) from None

    def to_env(self) -> dict[str, str]:
        """The ``SCRIPTPOOL_*`` variables that rebuild these settings in another process."""
        values = self.field_values()
        return {v.name: v.render(values[v.field]) for v in environment.VARIABLES}

    def field_values(self) -> dict[str, Any]:
        """Every field by its ``scriptpool.config.environment.VARIABLES`` name (``limits.fuel`` for a
        limit)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        values.update({f"limits.{k}": v for k, v in self.limits.as_dict().items()})
        return values


def _invalid(name: str, problem: str) -> None:
    raise ConfigurationError(f"{name} {problem}", field=name)
