"""Workers: the in-process engine (``Executor``) and, in ``workers.celery``, the sharded pool."""

from workers._cache import ByteLRU, CacheStats
from workers._executor import Executor, encode_input
from workers._report import ErrorInfo, Execution, ExecutionReport
from workers.sandbox import Sandbox

__all__ = [
    "ByteLRU",
    "CacheStats",
    "ErrorInfo",
    "Execution",
    "ExecutionReport",
    "Executor",
    "Sandbox",
    "encode_input",
]
