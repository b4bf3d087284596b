"""Workers: the in-process engine (``Executor``) and the sharded Celery pool around it.

``celery -A workers worker`` finds the app in ``workers.celery``. Names load lazily, so a host
process that only enqueues (and imports ``create_app``) never loads wasmtime.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ByteLRU": "workers._cache",
    "CacheStats": "workers._cache",
    "ErrorInfo": "workers._report",
    "Execution": "workers._report",
    "ExecutionReport": "workers._report",
    "Executor": "workers._executor",
    "Sandbox": "workers.sandbox",
    "create_app": "workers._app",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'workers' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
