"""Shard groups: which Redis (a primary, or a Sentinel set) serves which shards.

``SCRIPTPOOL_SHARD_GROUPS="0-7=redis://a:6379/0;8-15=sentinel://s1,s2,s3/b/0"`` splits the shards
over several Redis deployments: each shard's queue, its shops' bindings and history, the modules
they use, its workers' heartbeats and its callers' replies live in its group's Redis. Extension
points and providers are written to every group. Unset, every shard is on ``SCRIPTPOOL_REDIS_URL``:
one group.

Why groups and not Redis Cluster: kombu has no Cluster transport, and its multi-key BRPOP, MULTI
and Lua hit CROSSSLOT there; one Redis (or Sentinel set) per group of queues, with the producer
routing by key, is how a Celery and Redis deployment grows past one primary.

Public as ``scriptpool.config.groups`` for the text form (:func:`parse_shard_groups`,
:func:`render_shard_groups`, :func:`ranges_text`), which only settings and the command-line tool
handle; :class:`ShardGroup` is also a name of ``scriptpool.config``, since every side routes by it.
"""

from __future__ import annotations

from dataclasses import dataclass

from scriptpool.config.errors import ConfigurationError
from scriptpool.config.redis import check_redis_url, describe_redis_url

__all__ = ["ShardGroup", "parse_shard_groups", "ranges_text", "render_shard_groups"]

VARIABLE = "SCRIPTPOOL_SHARD_GROUPS"


@dataclass(frozen=True, slots=True)
class ShardGroup:
    """Some shards and the Redis that serves them. ``name`` is its shard ranges (``0-7``)."""

    name: str
    url: str
    shards: tuple[int, ...]

    def describe(self) -> str:
        """The group for a message: its shards and where its Redis is, without credentials."""
        return f"group {self.name} ({describe_redis_url(self.url)})"


def ranges_text(shards: tuple[int, ...] | list[int]) -> str:
    """``0-3,6`` for shards 0, 1, 2, 3 and 6."""
    ordered = sorted(shards)
    parts: list[str] = []
    start = prev = ordered[0]
    for shard in [*ordered[1:], -2]:  # -2 never follows: it closes the last range
        if shard == prev + 1:
            prev = shard
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = shard
    return ",".join(parts)


def _parse_ranges(text: str, count: int) -> list[int]:
    """The shards ``text`` names, each checked to be below ``count`` before any is listed (a
    range such as 0-999999999 would otherwise be listed in full first)."""
    shards: list[int] = []
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
            raise ConfigurationError(
                f"{VARIABLE}: {part!r} is not a shard number or range such as 0-7", variable=VARIABLE
            )
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ConfigurationError(f"{VARIABLE}: range {part!r} runs backwards", variable=VARIABLE)
        if high >= count:
            raise ConfigurationError(
                f"{VARIABLE} names shard {high}, but SCRIPTPOOL_SHARDS={count} means shards 0..{count - 1}",
                variable=VARIABLE,
            )
        shards.extend(range(low, high + 1))
    return shards


def parse_shard_groups(text: str, shards: int, default_url: str) -> tuple[ShardGroup, ...]:
    """The groups of ``text`` (``RANGES=URL;RANGES=URL``), checked to cover shards
    ``0..shards-1`` exactly once; an empty ``text`` is one group on ``default_url``.

    Entries naming the same URL are one group. A ``;`` inside a URL (a password) must be
    written ``%3B``.
    """
    if not text.strip():
        return (ShardGroup(ranges_text(list(range(shards))), default_url, tuple(range(shards))),)
    owner: dict[int, str] = {}
    by_url: dict[str, list[int]] = {}
    for entry in text.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ranges, equals, url = entry.partition("=")
        url = url.strip()
        if not equals or not url:
            raise ConfigurationError(
                f"{VARIABLE} entries look like 0-7=redis://host:6379/0, got {entry.split('@')[-1]!r}",
                variable=VARIABLE,
            )
        check_redis_url(url, VARIABLE)
        for shard in _parse_ranges(ranges, shards):
            if shard in owner and owner[shard] != url:
                raise ConfigurationError(
                    f"{VARIABLE} puts shard {shard} in two groups "
                    f"({describe_redis_url(owner[shard])} and {describe_redis_url(url)})",
                    variable=VARIABLE,
                )
            owner[shard] = url
            if shard not in by_url.setdefault(url, []):
                by_url[url].append(shard)
    missing = [shard for shard in range(shards) if shard not in owner]
    if missing:
        raise ConfigurationError(
            f"{VARIABLE} leaves shard(s) {ranges_text(missing)} without a group "
            f"(SCRIPTPOOL_SHARDS={shards}: every shard 0..{shards - 1} needs one)",
            variable=VARIABLE,
        )
    groups = [ShardGroup(ranges_text(found), url, tuple(sorted(found))) for url, found in by_url.items()]
    return tuple(sorted(groups, key=lambda group: group.shards[0]))


def render_shard_groups(groups: tuple[ShardGroup, ...] | list[ShardGroup]) -> str:
    """The ``SCRIPTPOOL_SHARD_GROUPS`` text of ``groups`` (the inverse of :func:`parse_shard_groups`)."""
    return ";".join(f"{group.name}={group.url}" for group in groups)
