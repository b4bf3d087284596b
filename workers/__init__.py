"""Workers: the in-process engine (``Executor``) and the sharded Celery pool around it.

``celery -A workers worker`` finds the app in ``workers.celery``.
"""

from workers._app import create_app
from workers._cache import ByteLRU, CacheStats
from workers._executor import Executor

__all__ = ["ByteLRU", "CacheStats", "Executor", "create_app"]
