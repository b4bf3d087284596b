"""Workers: the in-process engine (``Executor``) and the sharded Celery pool around it; the
captured runs workers keep (``CaptureStore``), and runs outside the pool on the same path
(``run_loaded``, ``replay``).

``celery -A scriptpool.workers worker`` finds the app in ``scriptpool.workers.celery``.
"""

from scriptpool.workers._app import create_app
from scriptpool.workers._cache import ByteLRU, CacheStats
from scriptpool.workers._capture import (
    CaptureStore,
    CaptureWriter,
    RunSummary,
    describe,
    recorded_output,
    valid_run_id,
)
from scriptpool.workers._executor import Executor
from scriptpool.workers._local import LocalRun, Replayed, local_script, replay, run_loaded
from scriptpool.workers._script import decode_output

__all__ = [
    "ByteLRU",
    "CacheStats",
    "CaptureStore",
    "CaptureWriter",
    "Executor",
    "LocalRun",
    "Replayed",
    "RunSummary",
    "create_app",
    "decode_output",
    "describe",
    "local_script",
    "recorded_output",
    "replay",
    "run_loaded",
    "valid_run_id",
]
