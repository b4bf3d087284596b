"""A registry set up in one call, as a test of a host (or of scriptpool) needs one."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from scriptpool.config import Settings
    from scriptpool.engine import Sandbox
    from scriptpool.registry import Registry


def make_registry(
    settings: Settings,
    define: Iterable[str] | Mapping[str, Mapping[str, Any]] = ("test",),
    *,
    deploy: Mapping[tuple[str, str], bytes] | None = None,
    providers: Mapping[str, bytes] | None = None,
    store: redis.Redis | None = None,
    sandbox: Sandbox | None = None,
) -> Registry:
    """A :class:`~scriptpool.registry.Registry` on ``settings``' Redis, with the extension points
    of ``define`` defined (names, or name -> ``define_extension_point`` options), the providers
    of ``providers`` (name -> wasm) added, and the scripts of ``deploy`` ((ep, shop) -> wasm)
    deployed, in that order. ``store`` is the Redis client to use (default: a new one on
    ``settings.redis_url``), ``sandbox`` the engine that checks deploys (default: a new one)."""
    from scriptpool.engine import Sandbox
    from scriptpool.registry import Registry

    registry = Registry(
        store if store is not None else redis.Redis.from_url(settings.redis_url),
        settings,
        sandbox if sandbox is not None else Sandbox(),
    )
    options: Mapping[str, Mapping[str, Any]] = (
        define if isinstance(define, Mapping) else {ep: {} for ep in define}
    )
    for ep, ep_options in options.items():
        registry.define_extension_point(ep, **ep_options)
    for name, wasm in (providers or {}).items():
        registry.add_provider(name, wasm)
    for (ep, shop), wasm in (deploy or {}).items():
        registry.deploy(ep, shop, wasm)
    return registry
