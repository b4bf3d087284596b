"""Providers: modules (a JS runtime, say) installed under an import-module name, which scripts
link by importing that name; stored and compiled like scripts, in every group's Redis.

A mixin of :class:`Registry` (``registry/_registry.py``), on top of its module store.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import wasmtime

from scriptpool.config import get_logger
from scriptpool.config.errors import ProviderNotFound
from scriptpool.engine import GUEST_MEMORY_MODULE, WASI_MODULE
from scriptpool.registry._compile import check_and_compile_provider
from scriptpool.registry._module_store import ModuleStore
from scriptpool.registry._validate import ModuleShape

log = get_logger("registry")


@dataclass(frozen=True, slots=True)
class Provider:
    """An installed provider module (e.g. a JS runtime), linked by its import-module name."""

    name: str
    sha256: str
    installed_at: float


class Providers(ModuleStore):
    """The provider methods of :class:`Registry`."""

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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
