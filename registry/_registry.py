"""The registry: extension points, the module store, providers, and the deploy stage, which
validates a module, stores it content-addressed, AOT-compiles it once, signs it and binds it
atomically; rollback, undeploy, history and the worker's lookups of what is bound.

:class:`Registry` is one object over one Redis; its extension points (``registry/_definitions.py``),
module store (``registry/_module_store.py``) and providers (``registry/_providers.py``) are
mixins, each in a module of its own.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import asdict
from typing import Any

import redis

from scriptpool.config import (
    ExtensionPoint,
    Settings,
    check_app,
    check_ep,
    check_export,
    check_shop_id,
    get_logger,
)
from scriptpool.config.errors import InvalidArgument, ScriptNotFound
from scriptpool.config.extension_points import REDUCER_APP
from scriptpool.engine import Sandbox, engine_fingerprint
from scriptpool.registry._bindings import DEFAULT_APP, Bindings, BindingSet, Deployment
from scriptpool.registry._candidate import Candidate, RolloutRules
from scriptpool.registry._compile import compile_script
from scriptpool.registry._definitions import DEFINE, ExtensionPoints
from scriptpool.registry._providers import Providers
from scriptpool.registry._queries import check_query, query_digest
from scriptpool.registry._rollouts import Rollouts

log = get_logger("registry")


class Registry(ExtensionPoints, Providers):
    """Deploys modules and answers lookups, backed by Redis. Pass it a client and settings."""

    def __init__(self, client: redis.Redis, settings: Settings, sandbox: Sandbox) -> None:
        self._redis = client
        self._settings = settings
        self._keys = settings.keys
        self._sandbox = sandbox
        self._fingerprint = engine_fingerprint()
        self._bindings = Bindings(client, self._keys)
        self._rollouts = Rollouts(client, self._keys)
        self._define = client.register_script(DEFINE)
        self._refused = OrderedDict()  # see ModuleStore
        self._refused_lock = threading.Lock()

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
        input_query: str | None = None,
    ) -> Deployment:
        """Validate, store, AOT-compile and bind ``wasm`` as ``app``'s script at (``ep``,
        ``shop_id``). A single EP binds one app; a join or chain EP up to 25 (the 26th is
        :class:`TooManyApps`), plus, for a ``wasm`` reducer, the app named ``reducer``.

        ``input_query`` (GraphQL text against the EP's input schema) is what the script reads
        of the input; it is checked first, so a refused one (:class:`InvalidInputQuery`, with
        the problem, line and column) stores nothing. None: the script gets the whole input."""
        template, definition = self._prepare(ep, shop_id, wasm, export, app, block_on_failure, input_query)
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
        input_query: str | None = None,
    ) -> Candidate:
        """Validate, store, compile and sign ``wasm`` as a deploy would, and put it beside
        ``app``'s live script at (``ep``, ``shop_id``) as the candidate of a rollout: callers get
        the live version until the candidate is promoted. One rollout per (EP, shop) at a time.
        ``input_query`` is the candidate's (checked as :meth:`deploy` checks it); promotion binds
        it with the module."""
        template, _ = self._prepare(ep, shop_id, wasm, export, app, block_on_failure, input_query)
        candidate = self.rollouts.start(template, rules)
        log.info("rollout_started", **_logged(template), rollout=candidate.id, rules=asdict(rules))
        return candidate

    def _prepare(
        self,
        ep: str,
        shop_id: str | int,
        wasm: bytes,
        export: str,
        app: str,
        block_on_failure: bool,
        input_query: str | None,
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
        if input_query is not None:
            # Before the module is stored: a refused query leaves Redis as it was.
            check_query(definition, input_query)
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
            "input_query": input_query,
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


def _logged(template: dict[str, Any]) -> dict[str, Any]:
    """The fields of a deploy's log event (an input query by its digest's first 12 digits)."""
    logged = {k: template[k] for k in ("ep", "shop_id", "app", "sha256", "codec")}
    if template["input_query"] is not None:
        logged["input_query"] = query_digest(template["input_query"])[:12]
    return logged
