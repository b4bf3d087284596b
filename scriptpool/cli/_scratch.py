"""What the ``demo`` and ``bench`` commands create in a Redis, under names of their own, and remove
again: on a borrowed Redis (``--external``) nothing of the user's may be overwritten or left behind."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

    from scriptpool.config import Settings
    from scriptpool.registry import Deployment, Registry


class Scratch:
    """What a tool creates in a Redis, under names of its own, removed again by :meth:`cleanup`.

    With a ``prefix`` (a borrowed Redis) every extension point and shop gets it, so nothing the
    user has is overwritten, and cleanup removes exactly what was created: bindings, histories,
    EP definitions, and modules that were not stored before. Its EPs are defined with capture
    off there, so the user's workers store no captured runs of ours (some would come late: a
    slow script's run ends after its caller gave up). The usage the user's workers counted for
    its shops is removed too (given ``client`` and ``settings``), twice: once at once, and again
    after the workers' next usage flush has come in.
    """

    def __init__(
        self,
        registry: Registry,
        prefix: str = "",
        *,
        client: redis.Redis | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.registry = registry
        self.prefix = prefix
        self._client = client
        self._settings = settings
        self._first_minute = int(time.time()) // 60
        self._eps: list[str] = []
        self._bindings: list[tuple[str, str]] = []
        self._modules: set[str] = set()

    def name(self, name: str) -> str:
        return f"{self.prefix}-{name}" if self.prefix else name

    def define(self, name: str, **options: Any) -> str:
        ep = self.name(name)
        if self.prefix:
            options.setdefault("capture", False)
        self.registry.define_extension_point(ep, **options)
        self._eps.append(ep)
        return ep

    def deploy(self, ep: str, shop: str, wasm: bytes) -> Deployment:
        sha = hashlib.sha256(wasm).hexdigest()
        if not self.registry.has_module(sha):
            self._modules.add(sha)
        deployment = self.registry.deploy(ep, shop, wasm)
        self._bindings.append((ep, shop))
        return deployment

    def cleanup(self) -> None:
        for ep, shop in self._bindings:
            self.registry.undeploy(ep, shop)
        for ep in self._eps:
            self.registry.remove_extension_point(ep)
        for sha in self._modules:
            self.registry.remove_module(sha)
        if self.prefix and self._client is not None and self._settings is not None:
            self._forget_usage(self._client, self._settings)
            time.sleep(self._settings.usage_flush_s + 0.5)  # the workers' last flush of ours
            self._forget_usage(self._client, self._settings)

    def _forget_usage(self, client: redis.Redis, settings: Settings) -> None:
        keys = settings.keys
        shops = {shop for _, shop in self._bindings}
        minutes = range(self._first_minute - 1, int(time.time()) // 60 + 2)
        with client.pipeline(transaction=False) as pipe:
            for minute in minutes:
                for shop in shops:
                    pipe.delete(keys.usage(shop, minute))
                    pipe.srem(keys.usage_shops(minute), shop)
            pipe.execute()


def scratch_prefix(label: str) -> str:
    """A name prefix no user and no earlier run has: ``<label>-<6 hex digits>``."""
    return f"{label}-{secrets.token_hex(3)}"
