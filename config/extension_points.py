"""Extension points as stored in Redis, and the one cached reader the client and executor share.

Public as ``scriptpool.config.extension_points`` for the combine kinds (:data:`SINGLE`,
:data:`JOIN`, :data:`CHAIN`), :data:`REDUCER_APP` and :data:`MAX_APPS`, which only the registry
and what runs scripts read; :class:`ExtensionPoint` and :class:`ExtensionPointReader` are also
names of ``scriptpool.config``, since every side reads EPs.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis

from scriptpool.config._keys import Keys
from scriptpool.config.errors import ConfigurationError, ScriptpoolError, UnknownExtensionPoint
from scriptpool.config.input_query import MAX_QUERY_BYTES, MAX_QUERY_COST
from scriptpool.config.limits import Limits
from scriptpool.config.scale import check_scale_rules
from scriptpool.config.store import MAX_SESSION_TTL_S, MIN_SESSION_TTL_S

__all__ = ["CHAIN", "JOIN", "MAX_APPS", "REDUCER_APP", "SINGLE", "ExtensionPoint", "ExtensionPointReader"]

T = TypeVar("T")

# An unknown EP is asked about again after this long, so a newly defined one is seen soon.
UNKNOWN_RECHECK_S = 1.0


# How the scripts of several apps at one (EP, shop) combine.
SINGLE, JOIN, CHAIN = "single", "join", "chain"
COMBINES = (SINGLE, JOIN, CHAIN)
# Apps at one (EP, shop) of a join or chain EP (the reducer app not counted); a single EP has one.
MAX_APPS = 25
# The app whose module combines a join's outputs when the EP's reducer is ``wasm``.
REDUCER_APP = "reducer"
# How far an EP may move the input-query caps (Shopify's 3,000 bytes and cost 30 by default): the
# compile of a query scans and walks it, so even a raised cap stays bounded. The SDL is bounded
# too: every client and worker reads the record.
QUERY_BYTES_RANGE = (1, 65_536)
QUERY_COST_RANGE = (1, 1_000)
MAX_INPUT_GRAPHQL_CHARS = 1_048_576
_REDUCER = re.compile(r"(first|wasm|(concat|max|min):[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)")


@dataclass(frozen=True, slots=True)
class ExtensionPoint:
    """A place in checkout that scripts customise, e.g. ``discount``.

    ``combine`` says how the scripts of several apps combine: ``single`` (one script per shop),
    ``join`` (each gets the input; ``reducer`` combines their outputs) or ``chain`` (in app
    order, each gets the input and the previous script's output). ``scale`` maps JSON paths of
    lists to rates (``scriptpool.config.scale``). Workers capture this EP's failed runs for replay, and the
    share ``capture_rate`` of its successful ones, unless ``capture`` is off (or
    ``SCRIPTPOOL_CAPTURE`` is, everywhere).

    ``input_graphql`` is the input's GraphQL schema (SDL, root type ``Input``), against which
    each deployment's input query is checked, held to ``max_query_bytes`` and
    ``max_query_cost`` (``scriptpool.config.input_query``). The record keeps the text only:
    the schema is built where it is used.

    ``session_ttl_s`` is how long a session of this EP's scripts lives after its last write
    (None: ``scriptpool.config.store.DEFAULT_SESSION_TTL_S``).
    """

    name: str
    limit_overrides: dict[str, int] = field(default_factory=dict)
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    input_validation_rate: float | None = None
    combine: str = SINGLE
    reducer: str | None = None
    scale: dict[str, float] = field(default_factory=dict)
    capture_rate: float = 0.0
    capture: bool = True
    input_graphql: str | None = None
    max_query_bytes: int = MAX_QUERY_BYTES
    max_query_cost: int = MAX_QUERY_COST
    session_ttl_s: int | None = None

    def __post_init__(self) -> None:
        # A definition is also read back from Redis, where anyone who can write may have put
        # anything: every field is checked here, so that what a worker cannot honour fails its
        # jobs by name (configuration_error) instead of deep in wasmtime, ctypes or jsonschema.
        if not isinstance(self.name, str):
            raise ConfigurationError(f"an extension point's name is text, got {_shown(self.name)}")
        Limits().with_overrides(self.limit_overrides)  # names, types and ranges
        for what, schema in (("input_schema", self.input_schema), ("output_schema", self.output_schema)):
            if schema is not None and not isinstance(schema, dict):
                raise ConfigurationError(f"{what} must be a JSON object, got {_shown(schema)}")
        rate = self.input_validation_rate
        if rate is not None and (
            not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0
        ):
            raise ConfigurationError(f"input_validation_rate must lie in [0, 1], got {_shown(rate)}")
        if self.reducer is not None and not isinstance(self.reducer, str):
            raise ConfigurationError(f"reducer must be text, got {_shown(self.reducer)}")
        check_scale_rules(self.scale)
        if (
            not isinstance(self.capture_rate, (int, float))
            or isinstance(self.capture_rate, bool)
            or not 0.0 <= self.capture_rate <= 1.0
        ):
            raise ConfigurationError(f"capture_rate must lie in [0, 1], got {self.capture_rate!r}")
        if self.combine not in COMBINES:
            raise ConfigurationError(f"combine must be one of {', '.join(COMBINES)}, got {self.combine!r}")
        if self.combine == JOIN and self.reducer is None:
            raise ConfigurationError(
                "a join extension point needs a reducer: concat:PATH, first, max:PATH, min:PATH or wasm"
            )
        if self.combine != JOIN and self.reducer is not None:
            raise ConfigurationError(
                f"only a join extension point has a reducer (this one is {self.combine})"
            )
        if self.reducer is not None and not _REDUCER.fullmatch(self.reducer):
            raise ConfigurationError(
                f"reducer must be concat:PATH, first, max:PATH, min:PATH or wasm (PATH like discounts or "
                f"cart.operations), got {self.reducer!r}"
            )
        if self.input_graphql is not None and (
            not isinstance(self.input_graphql, str)
            or not self.input_graphql.strip()
            or len(self.input_graphql) > MAX_INPUT_GRAPHQL_CHARS
        ):
            raise ConfigurationError(
                f"input_graphql must be GraphQL SDL text of at most {MAX_INPUT_GRAPHQL_CHARS:,} "
                f"characters, got {_shown(self.input_graphql)}"
            )
        for what, value, (low, high) in (
            ("max_query_bytes", self.max_query_bytes, QUERY_BYTES_RANGE),
            ("max_query_cost", self.max_query_cost, QUERY_COST_RANGE),
        ):
            if type(value) is not int or not low <= value <= high:
                raise ConfigurationError(
                    f"{what} must be a whole number in [{low:,}, {high:,}], got {_shown(value)}"
                )
        ttl = self.session_ttl_s
        if ttl is not None and (type(ttl) is not int or not MIN_SESSION_TTL_S <= ttl <= MAX_SESSION_TTL_S):
            raise ConfigurationError(
                f"session_ttl_s must be whole seconds in [{MIN_SESSION_TTL_S:,}, {MAX_SESSION_TTL_S:,}] "
                f"(1 minute to 30 days), got {_shown(ttl)}"
            )

    @property
    def max_apps(self) -> int:
        """How many apps' scripts one shop may bind here."""
        return 1 if self.combine == SINGLE else MAX_APPS

    def limits(self, defaults: Limits) -> Limits:
        """The limits scripts at this EP run under."""
        return defaults.with_overrides(self.limit_overrides)

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "limit_overrides": self.limit_overrides,
                "input_schema": self.input_schema,
                "output_schema": self.output_schema,
                "input_validation_rate": self.input_validation_rate,
                "combine": self.combine,
                "reducer": self.reducer,
                "scale": self.scale,
                "capture_rate": self.capture_rate,
                "capture": self.capture,
                "input_graphql": self.input_graphql,
                "max_query_bytes": self.max_query_bytes,
                "max_query_cost": self.max_query_cost,
                "session_ttl_s": self.session_ttl_s,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ExtensionPoint:
        """The definition stored as ``raw``; :class:`ConfigurationError` for anything that is not
        a valid one (what a worker or a deploy reads from Redis is not trusted)."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ConfigurationError(f"a definition is a JSON object, got {type(data).__name__}")
            return cls(
                name=data["name"],
                limit_overrides=data.get("limit_overrides") or {},
                input_schema=data.get("input_schema"),
                output_schema=data.get("output_schema"),
                input_validation_rate=data.get("input_validation_rate"),
                combine=data.get("combine") or SINGLE,
                reducer=data.get("reducer"),
                scale=data.get("scale") or {},
                capture_rate=data.get("capture_rate") or 0.0,
                capture=bool(data.get("capture", True)),
                # Records from before input queries have none, and the default caps.
                input_graphql=data.get("input_graphql"),
                max_query_bytes=data.get("max_query_bytes", MAX_QUERY_BYTES),
                max_query_cost=data.get("max_query_cost", MAX_QUERY_COST),
                session_ttl_s=data.get("session_ttl_s"),  # records from before data: the default
            )
        except KeyError as exc:
            raise ConfigurationError(f"a definition has a name, this one has no {exc}") from None
        except (ValueError, TypeError, RecursionError) as exc:  # not JSON, too deep, unhashable
            raise ConfigurationError(f"a definition that is not one: {_shown(exc)}") from None


class ExtensionPointReader(Generic[T]):
    """Reads EP definitions from Redis and keeps what ``prepare`` derives from each, for ``ttl_s``.

    The client keeps an EP's limits; the executor keeps its limits with compiled schemas. Both
    forget an EP when told (:meth:`invalidate`) or when its entry expires. Thread-safe. Redis
    errors propagate: what they mean is the caller's to decide.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        prepare: Callable[[ExtensionPoint], T],
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._prepare = prepare
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, tuple[T | None, float]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> T:
        """What ``prepare`` made of EP ``name``, or :class:`UnknownExtensionPoint`. Asks Redis
        (a synchronous GET) unless the entry is fresh: a caller that must not wait on Redis
        asks :meth:`fresh` first, and reads off its own thread when that says None."""
        value = self.fresh(name)
        if value is not None:
            return value
        now = self._clock()
        raw = self._redis.get(self._keys.extension_point(name))
        value = self._read(name, raw) if raw is not None else None
        with self._lock:
            self._entries[name] = (value, now + (self._ttl_s if value is not None else UNKNOWN_RECHECK_S))
        if value is None:
            raise UnknownExtensionPoint(f"extension point {name!r} is not defined", ep=name)
        return value

    def fresh(self, name: str) -> T | None:
        """What :meth:`get` gives for EP ``name`` while its entry is fresh, without asking Redis
        (:class:`UnknownExtensionPoint` for an EP known not to be defined); None when ``get``
        would have to ask Redis (never read, expired, or its record was unusable)."""
        entry = self._entries.get(name)
        if entry is None or entry[1] <= self._clock():
            return None
        if entry[0] is None:
            raise UnknownExtensionPoint(f"extension point {name!r} is not defined", ep=name)
        return entry[0]

    def _read(self, name: str, raw: bytes | str) -> T:
        """What ``prepare`` makes of the record ``raw`` of EP ``name``, or ConfigurationError
        naming the EP. A record that cannot be used is not kept: it is read again next time, so
        that redefining the EP mends it."""
        try:
            return self._prepare(ExtensionPoint.from_json(raw))
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"extension point {name!r} cannot be used as stored: {exc.message}",
                **{**exc.detail, "ep": name},
            ) from None
        except ScriptpoolError:
            raise
        except Exception as exc:  # what prepare builds from it (a schema, a reducer) failed
            raise ConfigurationError(
                f"extension point {name!r} cannot be used as stored: {_shown(exc)}", ep=name
            ) from None

    def peek(self, name: str) -> T | None:
        """What ``prepare`` last made of EP ``name``, expired or not, without asking Redis (None:
        never read, or not defined). For a caller that must not wait on a Redis not answering."""
        entry = self._entries.get(name)
        return None if entry is None else entry[0]

    def invalidate(self, name: str | None = None) -> None:
        """Forget EP ``name``, or every EP."""
        with self._lock:
            if name is None:
                self._entries.clear()
            else:
                self._entries.pop(name, None)


def _shown(value: object) -> str:
    """``value`` for a one-line message: its repr, cut short (a record may hold anything)."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
