"""Workers: the in-process engine (``Executor``) and the sharded Celery pool around it; the
captured runs workers keep (``CaptureStore``), and runs outside the pool on the same path
(``run_loaded``, ``replay``).

``celery -A workers worker`` finds the app in ``workers.celery``.
"""

from workers._app import create_app
from workers._cache import ByteLRU, CacheStats
from workers._capture import (
    CaptureStore,
    CaptureWriter,
    RunSummary,
    describe,
    recorded_output,
    valid_run_id,
)
from workers._executor import Executor
from workers._local import LocalRun, Replayed, local_script, replay, run_loaded
from workers._script import decode_output

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
