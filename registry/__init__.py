"""The deploy stage: extension points, providers, deployments and rollbacks, backed by Redis.

Names load lazily: ``ExtensionPoint`` is usable without loading wasmtime.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Deployment": "registry._registry",
    "Provider": "registry._registry",
    "Registry": "registry._registry",
    "ExtensionPoint": "registry._extension_points",
    "compile_validator": "registry._extension_points",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'registry' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
