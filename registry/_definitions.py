"""Extension points: defining one (saying what a redefinition changes, and refusing a change of
``combine`` while shops bind apps there, or of the input schema or query caps that a bound input
query would not pass), reading and listing them, and removing one.

A mixin of :class:`Registry` (``registry/_registry.py``), which holds the Redis client, settings
and keys it uses; every group's Redis keeps every extension point.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import redis

from scriptpool.config import (
    ExtensionPoint,
    ExtensionPointReader,
    Keys,
    Limits,
    Settings,
    check_ep,
    get_logger,
)
from scriptpool.config.errors import ConfigurationError, ExtensionPointInUse, UnknownExtensionPoint
from scriptpool.config.extension_points import SINGLE
from scriptpool.config.input_query import MAX_QUERY_BYTES, MAX_QUERY_COST
from scriptpool.config.scale import check_scale_rules
from scriptpool.registry._bindings import CANDIDATE, DEFAULT_APP, Deployment
from scriptpool.registry._candidate import Candidate
from scriptpool.registry._queries import broken_queries, build_input_schema
from scriptpool.registry._schemas import check_schema

log = get_logger("registry")

T = TypeVar("T")


# Store a definition only if the record is still the one the caller diffed against (ARGV[2];
# '' for none), so what `ep define` reports as replaced is what it replaced. KEYS: the EP's
# record, the set of EPs, the invalidation channel. ARGV: the definition, the expected record,
# the name, the invalidation message.
DEFINE = """
local old = redis.call('GET', KEYS[1])
if (old or '') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', KEYS[3], ARGV[4])
return 1
"""
_DEFINE_ATTEMPTS = 5

# The fields of a definition a redefinition reports, besides each limit (``limits.NAME``).
_REPORTED = (
    "input_schema",
    "output_schema",
    "input_validation_rate",
    "scale",
    "capture",
    "capture_rate",
    "input_graphql",
    "max_query_bytes",
    "max_query_cost",
    "session_ttl_s",
)
# What the refusal of a schema change lists of the bound queries it would break.
_BROKEN_SHOWN = 3


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field of an extension point that a definition changes: its name (``combine``,
    ``reducer``, ``limits.fuel``, ``output_schema``...), its value before and after (a limit's as
    the effective value, so dropping an override shows the default it falls back to) and a note:
    ``lowered`` for a limit that went down (a deployed script that needed more now fails on the
    inputs that need it)."""

    field: str
    before: Any
    after: Any
    note: str = ""


@dataclass(frozen=True, slots=True)
class Definition:
    """What :meth:`Registry.define` did (or, for a dry run, would do): the definition, the one
    it replaces (None if it creates the EP, or replaces a record that could not be read), what
    changes, and, when ``combine`` changes, how many shops bind apps there; when the input
    schema or a query cap changes under ``force``, the bound queries it breaks (``EP/SHOP app
    APP: problem (line L, column C)``, a rollout's candidate marked as such)."""

    ep: ExtensionPoint
    previous: ExtensionPoint | None
    changes: tuple[FieldChange, ...]
    created: bool
    bound_shops: int | None = None
    written: bool = True
    broken_queries: tuple[str, ...] = ()


class ExtensionPoints:
    """The extension point methods of :class:`Registry`."""

    _redis: redis.Redis
    _settings: Settings
    _keys: Keys
    _define: Callable[..., Any]  # the registered DEFINE script

    def define_extension_point(self, name: str, **fields: Any) -> ExtensionPoint:
        """Create or replace extension point ``name`` and return its definition: :meth:`define`
        with the same keyword arguments (limits and schemas, how several apps' scripts combine,
        scale rules, capture, the GraphQL input schema and its caps, the session TTL, ``force``),
        for a caller that does not need to hear what changed."""
        return self.define(name, **fields).ep

    def define(
        self,
        name: str,
        *,
        limits: dict[str, int] | None = None,
        input_schema: dict[str, Any] | None = None,
        output_schema: dict[str, Any] | None = None,
        input_validation_rate: float | None = None,
        combine: str = SINGLE,
        reducer: str | None = None,
        scale: dict[str, float] | None = None,
        capture_rate: float = 0.0,
        capture: bool = True,
        input_graphql: str | None = None,
        max_query_bytes: int = MAX_QUERY_BYTES,
        max_query_cost: int = MAX_QUERY_COST,
        session_ttl_s: int | None = None,
        force: bool = False,
        dry_run: bool = False,
    ) -> Definition:
        """Create or replace an extension point definition, answering what it replaced and what
        changed: its limit overrides and schemas, and how several apps' scripts combine
        (``single``, ``join`` with a ``reducer``, ``chain``); ``scale`` rules that raise limits
        with the input; whether workers capture its runs for replay (failed ones always,
        successful ones at ``capture_rate``); ``input_graphql``, the input's GraphQL schema (SDL
        whose root type is ``Input``) that deployments' input queries select from, held to
        ``max_query_bytes`` and ``max_query_cost``; ``session_ttl_s``, how long its scripts'
        sessions live after their last write (None: the default). Changing ``combine`` while apps
        are bound there, or the schema or caps so that a bound query no longer passes, is
        :class:`ExtensionPointInUse` unless ``force``.

        A definition replaces the whole record: a field not given goes back to its default, and
        the changes say so. Changing ``combine`` while shops bind apps there changes what every
        one of their calls runs (a ``single`` EP runs one of them; a ``chain`` hands each script
        another input), so it is :class:`ExtensionPointInUse` unless ``force``; so is changing
        the input schema or a query cap so that a query bound there (live, or a rollout's
        candidate) no longer passes, since its script would fail on every call. The rest is only
        reported. A schema that does not build is refused with the problem and its line and
        column (``invalid_argument``). ``dry_run`` checks and reports without writing. The
        record is replaced only if it is still the one compared against, so the changes are
        exactly what was replaced.
        """
        check_ep(name)
        self._settings.limits.with_overrides(limits)  # fails early on unknown or bad limits
        check_schema(input_schema, "input_schema")
        check_schema(output_schema, "output_schema")
        if input_validation_rate is not None and not 0.0 <= input_validation_rate <= 1.0:
            raise ConfigurationError("input_validation_rate must lie in [0, 1]")
        if input_graphql is not None:
            build_input_schema(input_graphql)  # it builds, with a root type Input, or says where it does not
        ep = ExtensionPoint(
            name,
            dict(limits or {}),
            input_schema,
            output_schema,
            input_validation_rate,
            combine,
            reducer,
            check_scale_rules(scale),
            capture_rate,
            capture,
            input_graphql,
            max_query_bytes,
            max_query_cost,
            session_ttl_s,
        )
        key = self._keys.extension_point(name)
        for _ in range(_DEFINE_ATTEMPTS):
            raw = cast("bytes | None", self._redis.get(key))
            definition = self._compare(ep, raw, force=force)
            if dry_run:
                return replace(definition, written=False)
            stored = self._define(
                keys=[key, self._keys.extension_points(), self._keys.invalidations()],
                args=[ep.to_json(), raw or b"", name, json.dumps({"ep": name})],
            )
            if stored:
                if definition.changes:
                    log.info(
                        "extension_point_defined", ep=name, created=definition.created,
                        changed=[change.field for change in definition.changes],
                    )  # fmt: skip
                return definition
        raise ExtensionPointInUse(
            f"extension point {name!r} changed {_DEFINE_ATTEMPTS} times while this definition was "
            "compared with it: someone else is defining it; look at it (`scriptpool ep show`) and try again",
            ep=name,
        )

    def _compare(self, ep: ExtensionPoint, raw: bytes | None, *, force: bool) -> Definition:
        """What replacing the record ``raw`` with ``ep`` changes; refuses a combine change while
        apps are bound, unless ``force``."""
        if raw is None:
            return Definition(ep, None, (), created=True)
        try:
            previous = ExtensionPoint.from_json(raw)
        except ConfigurationError as exc:  # what is stored is unusable: the definition mends it
            return Definition(
                ep, None, (FieldChange("definition", f"unreadable: {exc.message}", "replaced"),), False
            )
        changes = _changes(previous, ep, self._settings.limits)
        broken = self._check_queries(previous, ep, force=force)
        if previous.combine == ep.combine:
            return Definition(ep, previous, changes, created=False, broken_queries=broken)
        bound, sample = self.bound_shops(ep.name)
        if bound and not force:
            shown = "; ".join(f"{shop}: {', '.join(apps)}" for shop, apps in sample.items())
            more = ", ..." if bound > len(sample) else ""
            keep = f"combine {previous.combine}" + (
                f" and reducer {previous.reducer}" if previous.reducer else ""
            )
            flags = f"--combine {previous.combine}" + (
                f" --reducer {previous.reducer}" if previous.reducer else ""
            )
            raise ExtensionPointInUse(
                f"extension point {ep.name} combines its scripts with {previous.combine} and {bound} "
                f"shop(s) bind apps there ({shown}{more}); making it {ep.combine} would change what "
                f"every call there runs{' (a single EP runs one app)' if ep.combine == SINGLE else ''}. "
                f"To change only the rest, give {keep} again ({flags}); to change it anyway, force it "
                "(--force)",
                ep=ep.name,
                combine=previous.combine,
                requested=ep.combine,
                bound_shops=bound,
            )
        return Definition(ep, previous, changes, created=False, bound_shops=bound, broken_queries=broken)

    def _check_queries(self, previous: ExtensionPoint, ep: ExtensionPoint, *, force: bool) -> tuple[str, ...]:
        """The bound queries (live, and rollouts' candidates) that ``ep``'s schema and caps
        would refuse, when they differ from ``previous``'s; :class:`ExtensionPointInUse` naming
        them unless ``force``."""
        same = (previous.input_graphql, previous.max_query_bytes, previous.max_query_cost) == (
            ep.input_graphql,
            ep.max_query_bytes,
            ep.max_query_cost,
        )
        if same:
            return ()
        bound = sorted(self._bound_queries(ep.name), key=lambda pair: pair[0])  # by shop, app
        if not bound:
            return ()
        broken = broken_queries(ep, bound)
        if broken and not force:
            shown = "; ".join(broken[:_BROKEN_SHOWN]) + (", ..." if len(broken) > _BROKEN_SHOWN else "")
            raise ExtensionPointInUse(
                f"extension point {ep.name}: {len(broken)} input query(ies) bound there would no longer "
                f"pass its {'new input schema and caps' if ep.input_graphql else 'missing input schema'} "
                f"({shown}); their scripts would fail on every call. Deploy them with queries that pass "
                "first, or force it (--force)",
                ep=ep.name,
                broken=list(broken),
            )
        return tuple(broken)

    def _bound_queries(self, ep: str) -> Iterator[tuple[str, Deployment]]:
        """(where, deployment) of every app bound at ``ep`` with an input query, in this
        registry's Redis, a rollout's candidate included; scans the binding keys, as
        :meth:`bound_shops` does."""
        head = self._keys.binding(ep, "")
        for key in self._redis.scan_iter(match=f"{head}*", count=1000):
            shop = _text(key)[len(head) :]
            if ":" in shop:
                continue
            try:
                fields = self._redis.hgetall(key)
            except redis.ResponseError:  # a binding from before apps: no query
                continue
            for name, raw in sorted(fields.items()):
                field = _text(name)
                try:
                    if field == CANDIDATE:
                        candidate = Candidate.from_json(raw)
                        deployment = Deployment.from_json(json.dumps(candidate.deployment))
                        where = f"{ep}/{shop} app {candidate.app} (rollout candidate)"
                    elif field.startswith("#"):
                        continue
                    else:
                        deployment = Deployment.from_json(raw)
                        where = f"{ep}/{shop} app {field}"
                except (ConfigurationError, ValueError, TypeError, KeyError):
                    continue  # a record that cannot be read runs nothing, with or without a query
                if deployment.input_query is not None:
                    yield where, deployment

    def bound_shops(self, ep: str, *, sample: int = 3) -> tuple[int, dict[str, list[str]]]:
        """How many shops bind apps at ``ep`` in this registry's Redis (one shard group), and
        the apps of the first ``sample`` of them. It scans the binding keys (a cost that grows
        with the keyspace), so only a change of ``combine`` asks it."""
        check_ep(ep)
        count = 0
        found: dict[str, list[str]] = {}
        head = self._keys.binding(ep, "")
        for key in self._redis.scan_iter(match=f"{head}*", count=1000):
            shop = _text(key)[len(head) :]
            if ":" in shop:  # another EP's key that the pattern also matches: none today
                continue
            count += 1
            if len(found) < sample:
                try:
                    fields = self._redis.hkeys(key)
                except redis.ResponseError:  # a binding from before apps: one string, app default
                    fields = [DEFAULT_APP]
                found[shop] = sorted(n for n in map(_text, fields) if not n.startswith("#"))
        return count, found

    def extension_point(self, name: str) -> ExtensionPoint:
        """Return the definition of ``name`` or raise :class:`UnknownExtensionPoint`."""
        check_ep(name)
        raw = self._redis.get(self._keys.extension_point(name))
        if raw is None:
            raise UnknownExtensionPoint(f"extension point {name!r} is not defined", ep=name)
        return ExtensionPoint.from_json(raw)

    def extension_point_reader(self, prepare: Callable[[ExtensionPoint], T]) -> ExtensionPointReader[T]:
        """A cached reader of EP definitions that keeps ``prepare(ep)`` (the executor's view)."""
        return ExtensionPointReader(
            self._redis, self._keys, prepare, ttl_s=self._settings.binding_cache_ttl_s
        )

    def extension_points(self) -> list[str]:
        """Names of every defined extension point."""
        return sorted(_text(n) for n in self._redis.smembers(self._keys.extension_points()))

    def remove_extension_point(self, name: str) -> bool:
        """Delete an EP definition (its bindings stay until removed; they cannot run without it)."""
        check_ep(name)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.extension_point(name))
            pipe.srem(self._keys.extension_points(), name)
            pipe.publish(self._keys.invalidations(), json.dumps({"ep": name}))
            removed, _, _ = pipe.execute()
        return bool(removed)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _changes(before: ExtensionPoint, after: ExtensionPoint, defaults: Limits) -> tuple[FieldChange, ...]:
    """The fields ``after`` changes from ``before``, in a fixed order."""
    found = [
        FieldChange(name, getattr(before, name), getattr(after, name)) for name in ("combine", "reducer")
    ]
    old, new = before.limits(defaults).as_dict(), after.limits(defaults).as_dict()
    found += [
        FieldChange(f"limits.{name}", old[name], value, "lowered" if value < old[name] else "")
        for name, value in new.items()
    ]
    found += [FieldChange(name, getattr(before, name), getattr(after, name)) for name in _REPORTED]
    return tuple(change for change in found if change.before != change.after)
