"""The deploy stage: validate, store content-addressed, AOT-compile once, sign, bind atomically."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar, cast

import redis
import wasmtime

from scriptpool.config import (
    REDUCER_APP,
    SINGLE,
    ExtensionPoint,
    ExtensionPointReader,
    Limits,
    Settings,
    check_app,
    check_ep,
    check_export,
    check_scale_rules,
    check_shop_id,
    get_logger,
)
from scriptpool.config.errors import (
    ArtifactRejected,
    ConfigurationError,
    ExtensionPointInUse,
    InvalidArgument,
    InvalidModule,
    ModuleTooLarge,
    ProviderNotFound,
    ScriptNotFound,
    UnknownExtensionPoint,
)
from scriptpool.engine import (
    GUEST_MEMORY_MODULE,
    WASI_MODULE,
    Sandbox,
    engine_fingerprint,
)
from scriptpool.registry import _artifact
from scriptpool.registry._bindings import DEFAULT_APP, Bindings, BindingSet, Deployment
from scriptpool.registry._bounded_compile import compile_bounded
from scriptpool.registry._candidate import Candidate, RolloutRules
from scriptpool.registry._compile import check_and_compile_provider, compile_script
from scriptpool.registry._rewrite import linkable
from scriptpool.registry._rollouts import Rollouts
from scriptpool.registry._schemas import check_schema
from scriptpool.registry._structure import read_structure
from scriptpool.registry._validate import ModuleShape

log = get_logger("registry")

T = TypeVar("T")

# A module a worker failed to compile (over a cap or a bound, or invalid) is not tried again for
# this long: each job that names it gets the same error at once instead of another compile.
# Not forever: a compile that ran out of time on a loaded machine gets another chance.
REFUSED_TTL_S = 60.0
_REFUSED_ENTRIES = 256


# Store a definition only if the record is still the one the caller diffed against (ARGV[2];
# '' for none), so what `ep define` reports as replaced is what it replaced. KEYS: the EP's
# record, the set of EPs, the invalidation channel. ARGV: the definition, the expected record,
# the name, the invalidation message.
_DEFINE = """
local old = redis.call('GET', KEYS[1])
if (old or '') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', KEYS[3], ARGV[4])
return 1
"""
_DEFINE_ATTEMPTS = 5

# The fields of a definition a redefinition reports, besides each limit (``limits.NAME``).
_REPORTED = ("input_schema", "output_schema", "input_validation_rate", "scale", "capture", "capture_rate")


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
    changes, and, when ``combine`` changes, how many shops bind apps there."""

    ep: ExtensionPoint
    previous: ExtensionPoint | None
    changes: tuple[FieldChange, ...]
    created: bool
    bound_shops: int | None = None
    written: bool = True


@dataclass(frozen=True, slots=True)
class Provider:
    """An installed provider module (e.g. a JS runtime), linked by its import-module name."""

    name: str
    sha256: str
    installed_at: float


class Registry:
    """Deploys modules and answers lookups, backed by Redis. Pass it a client and settings."""

    def __init__(self, client: redis.Redis, settings: Settings, sandbox: Sandbox) -> None:
        self._redis = client
        self._settings = settings
        self._keys = settings.keys
        self._sandbox = sandbox
        self._fingerprint = engine_fingerprint()
        self._bindings = Bindings(client, self._keys)
        self._rollouts = Rollouts(client, self._keys)
        self._define = client.register_script(_DEFINE)
        # (sha256, stack bytes) -> (the error its compile gave, when to try again)
        self._refused: OrderedDict[tuple[str, int], tuple[InvalidModule, float]] = OrderedDict()
        self._refused_lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        """The engine fingerprint artifacts are compiled for."""
        return self._fingerprint

    # -- extension points ----------------------------------------------------------------------
    def define_extension_point(
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
        force: bool = False,
    ) -> ExtensionPoint:
        """Create or replace an extension point definition (see :meth:`define`, which also says
        what changed): its limit overrides and schemas, and how several apps' scripts combine
        (``single``, ``join`` with a ``reducer``, ``chain``); ``scale`` rules that raise limits
        with the input; whether workers capture its runs for replay (failed ones always,
        successful ones at ``capture_rate``). Changing ``combine`` while apps are bound there is
        :class:`ExtensionPointInUse` unless ``force``."""
        return self.define(
            name,
            limits=limits,
            input_schema=input_schema,
            output_schema=output_schema,
            input_validation_rate=input_validation_rate,
            combine=combine,
            reducer=reducer,
            scale=scale,
            capture_rate=capture_rate,
            capture=capture,
            force=force,
        ).ep

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
        force: bool = False,
        dry_run: bool = False,
    ) -> Definition:
        """:meth:`define_extension_point`, answering what it replaced and what changed.

        A definition replaces the whole record: a field not given goes back to its default, and
        the changes say so. Changing ``combine`` while shops bind apps there changes what every
        one of their calls runs (a ``single`` EP runs one of them; a ``chain`` hands each script
        another input), so it is :class:`ExtensionPointInUse` unless ``force``; the rest is only
        reported. ``dry_run`` checks and reports without writing. The record is replaced only if
        it is still the one compared against, so the changes are exactly what was replaced.
        """
        check_ep(name)
        self._settings.limits.with_overrides(limits)  # fails early on unknown or bad limits
        check_schema(input_schema, "input_schema")
        check_schema(output_schema, "output_schema")
        if input_validation_rate is not None and not 0.0 <= input_validation_rate <= 1.0:
            raise ConfigurationError("input_validation_rate must lie in [0, 1]")
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
        if previous.combine == ep.combine:
            return Definition(ep, previous, changes, created=False)
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
        return Definition(ep, previous, changes, created=False, bound_shops=bound)

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

    # -- providers -----------------------------------------------------------------------------
    def add_provider(self, name: str, wasm: bytes) -> Provider:
        """Install a provider module that scripts may import by ``name``."""
        compiled = check_and_compile_provider(
            self._sandbox, name, wasm, self._settings.provider_max_bytes, self._settings.limits.stack_bytes
        )
        sha = self._store_module(wasm, compiled.artifact)
        provider = Provider(name, sha, time.time())
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._keys.provider(name), json.dumps(asdict(provider)))
            pipe.sadd(self._keys.providers(), name)
            pipe.execute()
        log.info("provider_installed", provider=name, sha256=sha, bytes=len(wasm))
        return provider

    def provider(self, name: str) -> Provider:
        """Return the installed provider ``name`` or raise :class:`ProviderNotFound`."""
        raw = self._redis.get(self._keys.provider(name))
        if raw is None:
            raise ProviderNotFound(f"provider {name!r} is not installed", provider=name)
        return Provider(**json.loads(raw))

    def providers(self) -> list[str]:
        """Names of every installed provider."""
        return sorted(_text(n) for n in self._redis.smembers(self._keys.providers()))

    # -- deploy and rollback -------------------------------------------------------------------
    def deploy(
        self,
        ep: str,
        shop_id: str | int,
        wasm: bytes,
        *,
        export: str = "_start",
        app: str = DEFAULT_APP,
        block_on_failure: bool = False,
    ) -> Deployment:
        """Validate, store, AOT-compile and bind ``wasm`` as ``app``'s script at (``ep``,
        ``shop_id``). A single EP binds one app; a join or chain EP up to 25 (the 26th is
        :class:`TooManyApps`), plus, for a ``wasm`` reducer, the app named ``reducer``."""
        template, definition = self._prepare(ep, shop_id, wasm, export, app, block_on_failure)
        deployment = self._bindings.bind(template, max_apps=definition.max_apps)
        log.info("deployed", **_logged(template), version=deployment.version, bytes=len(wasm))
        return deployment

    def start_rollout(
        self,
        ep: str,
        shop_id: str | int,
        wasm: bytes,
        rules: RolloutRules,
        *,
        export: str = "_start",
        app: str = DEFAULT_APP,
        block_on_failure: bool = False,
    ) -> Candidate:
        """Validate, store, compile and sign ``wasm`` as a deploy would, and put it beside
        ``app``'s live script at (``ep``, ``shop_id``) as the candidate of a rollout: callers get
        the live version until the candidate is promoted. One rollout per (EP, shop) at a time."""
        template, _ = self._prepare(ep, shop_id, wasm, export, app, block_on_failure)
        candidate = self.rollouts.start(template, rules)
        log.info("rollout_started", **_logged(template), rollout=candidate.id, rules=asdict(rules))
        return candidate

    def _prepare(
        self, ep: str, shop_id: str | int, wasm: bytes, export: str, app: str, block_on_failure: bool
    ) -> tuple[dict[str, Any], ExtensionPoint]:
        """Check, store and compile a module; the deployment to bind (version still 0)."""
        shop = check_shop_id(shop_id)
        check_export(export)
        check_app(app)
        definition = self.extension_point(ep)
        if app == REDUCER_APP and definition.reducer != "wasm":
            raise InvalidArgument(
                f"app {REDUCER_APP!r} is the Wasm reducer of a join EP whose reducer is wasm; {ep} has none",
                app=app,
            )
        limits = definition.limits(self._settings.limits)
        compiled = compile_script(
            self._sandbox, wasm, limits, export, lambda m: self._installed_providers(m, limits.stack_bytes)
        )
        codec, resolution, used = compiled.codec, compiled.resolution, [list(p) for p in compiled.providers]
        sha = self._store_module(wasm, compiled.artifact)
        template = {
            "ep": ep,
            "shop_id": shop,
            "sha256": sha,
            "export": export,
            "version": 0,
            "providers": used,
            "stack_bytes": limits.stack_bytes,
            "deployed_at": time.time(),
            "app": app,
            "block_on_failure": block_on_failure,
            "codec": codec,
        }
        log.debug(
            "module_linked", sha256=sha, memory_io=resolution.memory_io, glue=list(resolution.glue_functions)
        )
        return template, definition

    def rollback(
        self, ep: str, shop_id: str | int, *, app: str = DEFAULT_APP, to: int | None = None
    ) -> Deployment:
        """Rebind ``app`` at (``ep``, ``shop_id``) to a version it kept: ``to`` (earlier or later
        than the live one), or by default the newest one below the live one that was not itself
        rolled back. The replaced version stays in the history, so a later ``to`` can bind it
        again; :class:`NothingToRollBack` names the versions kept when there is no such one."""
        shop = check_shop_id(shop_id)
        if to is not None and (isinstance(to, bool) or not isinstance(to, int) or to < 1):
            raise InvalidArgument(f"a version is a whole number from 1, got {to!r}")
        deployment, replaced = self._bindings.rollback(check_ep(ep), shop, check_app(app), to)
        log.info(
            "rolled_back", ep=ep, shop=shop, app=app, sha256=deployment.sha256, version=deployment.version,
            replaced_version=replaced,
        )  # fmt: skip
        return deployment

    def undeploy(self, ep: str, shop_id: str | int, *, app: str = DEFAULT_APP) -> bool:
        """Unbind ``app`` at (``ep``, ``shop_id``) and drop its history; every worker forgets it
        at once. False if it was not bound."""
        shop = check_shop_id(shop_id)
        removed = self._bindings.unbind(check_ep(ep), shop, check_app(app))
        log.info("undeployed", ep=ep, shop=shop, app=app, removed=removed)
        return removed

    def history(self, ep: str, shop_id: str | int, *, app: str = DEFAULT_APP) -> list[Deployment]:
        """The versions of ``app`` at (``ep``, ``shop_id``) kept besides the live one (earlier
        ones and, after a rollback, later ones), the most recently live first."""
        return self._bindings.history(check_ep(ep), check_shop_id(shop_id), check_app(app))

    @property
    def rollouts(self) -> Rollouts:
        """Rollouts in this registry's Redis: status, the worker's comparisons, promote, abort."""
        return self._rollouts

    def module_size(self, sha256: str) -> int:
        """Size in bytes of a stored module (0 if it is missing)."""
        return int(self._redis.strlen(self._keys.module(sha256)))

    def has_module(self, sha256: str) -> bool:
        """Whether the registry stores the module with this content address."""
        return bool(self._redis.exists(self._keys.module(sha256)))

    # -- removal (undeploy, and tools that clean up after themselves) ------------------------
    def remove_extension_point(self, name: str) -> bool:
        """Delete an EP definition (its bindings stay until removed; they cannot run without it)."""
        check_ep(name)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.extension_point(name))
            pipe.srem(self._keys.extension_points(), name)
            pipe.publish(self._keys.invalidations(), json.dumps({"ep": name}))
            removed, _, _ = pipe.execute()
        return bool(removed)

    def remove_module(self, sha256: str) -> None:
        """Delete a module's bytes and its artifact for this engine. Only for a module nothing
        binds: a binding that still names it would fall back to ``script_not_found``."""
        self._redis.delete(self._keys.module(sha256), self._keys.artifact(self._fingerprint, sha256))

    # -- lookups (the worker's side) -----------------------------------------------------------
    def bindings(self, ep: str, shop_id: str) -> BindingSet:
        """Every app's current deployment at (``ep``, ``shop_id``), in one read, or
        :class:`ScriptNotFound`."""
        return self._bindings.read(ep, shop_id)

    def binding(self, ep: str, shop_id: str, *, app: str = DEFAULT_APP) -> Deployment:
        """The current deployment of ``app`` at (``ep``, ``shop_id``), or :class:`ScriptNotFound`."""
        found = self._bindings.read(ep, shop_id).apps.get(app)
        if found is None:
            raise ScriptNotFound(f"app {app!r} has no script at {ep}/{shop_id}", ep=ep, shop=shop_id, app=app)
        return found

    def module_bytes(self, sha256: str) -> bytes:
        """Source bytes of a module, checked against their content address."""
        raw = cast("bytes | None", self._redis.get(self._keys.module(sha256)))
        if raw is None:
            raise ScriptNotFound(f"module {sha256} is missing from the registry", sha256=sha256)
        if hashlib.sha256(raw).hexdigest() != sha256:
            raise ArtifactRejected(f"stored bytes of module {sha256} do not match their hash", sha256=sha256)
        return bytes(raw)

    def verified_artifact(self, sha256: str) -> bytes | None:
        """The AOT artifact of a module for our engine, or None if missing.

        Raises :class:`ArtifactRejected` if it is present but its signature does not verify.
        """
        signed = cast("bytes | None", self._redis.get(self._keys.artifact(self._fingerprint, sha256)))
        if signed is None:
            return None
        key = self._settings.require_artifact_key()
        return _artifact.verify(key, self._fingerprint, sha256, signed)

    # -- internals -----------------------------------------------------------------------------
    def _store_module(self, wasm: bytes, artifact: bytes) -> str:
        sha = hashlib.sha256(wasm).hexdigest()
        key = self._settings.require_artifact_key()
        signed = _artifact.sign(key, self._fingerprint, sha, artifact)
        # Bytes and artifact land before any binding names them, so a reader that sees a new
        # binding always finds both; an interrupted deploy leaves only unreferenced blobs.
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._keys.module(sha), wasm)
            pipe.set(self._keys.artifact(self._fingerprint, sha), signed)
            pipe.execute()
        return sha

    def _installed_providers(
        self, module: ModuleShape, stack_bytes: int
    ) -> dict[str, tuple[wasmtime.Module, str]]:
        found: dict[str, tuple[wasmtime.Module, str]] = {}
        for imp in module.imports:
            if imp.module in (WASI_MODULE, GUEST_MEMORY_MODULE) or imp.module in found:
                continue
            try:
                provider = self.provider(imp.module)
            except ProviderNotFound:
                continue  # check_imports names it as a forbidden import
            found[imp.module] = (self.load_module(provider.sha256, stack_bytes)[0], provider.sha256)
        return found

    def load_module(
        self, sha256: str, stack_bytes: int, *, max_bytes: int | None = None
    ) -> tuple[wasmtime.Module, str, int]:
        """Load a module for running: deserialize its verified artifact, compiling only when the
        artifact is missing or rejected (see :meth:`compile_module`).

        Returns the module, ``"deserialized"`` or ``"compiled"``, and its artifact size, which
        approximates the code and metadata the module pins in memory.
        """
        try:
            artifact = self.verified_artifact(sha256)
        except ArtifactRejected:
            log.error("security_artifact_rejected", sha256=sha256, fingerprint=self._fingerprint)
            artifact = None
        if artifact is not None:
            return self._sandbox.deserialize(artifact, stack_bytes), "deserialized", len(artifact)
        module, size = self._compile_stored(sha256, stack_bytes, max_bytes)
        return module, "compiled", size

    def compile_module(
        self, sha256: str, stack_bytes: int, *, max_bytes: int | None = None
    ) -> wasmtime.Module:
        """Compile a stored module from its hash-checked bytes, with the deploy's rewrite, so it
        is the module its artifact was compiled from (no artifact key needed: a replay uses it).

        As a deploy compiles: a module larger than ``max_bytes`` (by default the provider size
        limit, the largest anything is installed at) is :class:`ModuleTooLarge` before it is
        read, then the structural caps and the bounded compile apply; what they refuse is
        refused again at once for :data:`REFUSED_TTL_S`.
        """
        return self._compile_stored(sha256, stack_bytes, max_bytes)[0]

    def _compile_stored(
        self, sha256: str, stack_bytes: int, max_bytes: int | None
    ) -> tuple[wasmtime.Module, int]:
        key = (sha256, stack_bytes)
        with self._refused_lock:
            refused = self._refused.get(key)
        if refused is not None and refused[1] > time.monotonic():
            error = refused[0]
            raise type(error)(error.message, **error.detail, repeated=True)
        limit = max_bytes if max_bytes is not None else self._settings.provider_max_bytes
        size = self.module_size(sha256)
        if size > limit:  # asked before the bytes are fetched: a planted giant costs nothing
            raise ModuleTooLarge(
                f"module {sha256} is {size} bytes; the limit is {limit}",
                size=size,
                limit=limit,
                sha256=sha256,
            )
        wasm = linkable(self.module_bytes(sha256))
        started = time.monotonic()
        try:
            read_structure(wasm)
            compiled = compile_bounded(wasm, stack_bytes)
        except InvalidModule as exc:
            exc.detail.setdefault("sha256", sha256)
            log.warning(
                "module_refused_on_compile", sha256=sha256, code=exc.code, error=exc.message,
                seconds=round(time.monotonic() - started, 3),
            )  # fmt: skip
            with self._refused_lock:
                self._refused[key] = (exc, time.monotonic() + REFUSED_TTL_S)
                self._refused.move_to_end(key)
                while len(self._refused) > _REFUSED_ENTRIES:
                    self._refused.popitem(last=False)
            raise
        log.info(
            "module_compiled", sha256=sha256, bytes=len(wasm), seconds=round(compiled.seconds, 3),
            peak_rss_bytes=compiled.peak_rss_bytes,
        )  # fmt: skip
        # Fresh from our own compile child, as at deploy (registry/_compile.py).
        return self._sandbox.deserialize(compiled.artifact, stack_bytes), len(compiled.artifact)


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


def _logged(template: dict[str, Any]) -> dict[str, Any]:
    """The fields of a deploy's log event."""
    return {k: template[k] for k in ("ep", "shop_id", "app", "sha256", "codec")}
