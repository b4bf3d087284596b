"""What tests and benchmarks of a host (and scriptpool's own) need, as ``structlog.testing`` is
for structlog: servers and a pool on this machine, the command line of a shard worker, a registry
set up in one call, and measuring helpers. None of it is needed to run scriptpool.

- :class:`EmbeddedRedis`: a private ``redis-server`` on a free loopback port, restartable.
- :class:`EmbeddedSentinelSet`: a private Sentinel set (primary, replicas, sentinels).
- :func:`find_redis_server`, :func:`free_port`: what those start with.
- :func:`local_pool`: a private Redis and one worker per shard (or the user's, ``external``).
- :func:`worker_argv`: the Celery command line of a shard worker (from ``scriptpool.workers``).
- :func:`make_registry`: a registry with extension points defined and scripts deployed.
- :func:`percentiles`, :func:`rss_mb`, :class:`CpuMeter`, :data:`TRIVIAL_WAT`: what the
  benchmarks measure with.

Each name is imported on first use: ``scriptpool demo`` and ``bench`` import the embedded Redis
from here, and should not pay for the registry or wasmtime to do so.
"""

from __future__ import annotations

from scriptpool._lazy import lazy_exports

# Not ``typing.TYPE_CHECKING``: importing typing is a cost the worker command need not pay, and
# mypy treats any constant of this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from scriptpool.testing._embedded_redis import EmbeddedRedis, find_redis_server, free_port
    from scriptpool.testing._embedded_sentinel import EmbeddedSentinelSet
    from scriptpool.testing._local_pool import local_pool
    from scriptpool.testing._measure import TRIVIAL_WAT, CpuMeter, percentiles, rss_mb
    from scriptpool.testing._registry import make_registry
    from scriptpool.workers import worker_argv

# Where each public name lives.
_HOMES = {
    "TRIVIAL_WAT": "scriptpool.testing._measure",
    "CpuMeter": "scriptpool.testing._measure",
    "EmbeddedRedis": "scriptpool.testing._embedded_redis",
    "EmbeddedSentinelSet": "scriptpool.testing._embedded_sentinel",
    "find_redis_server": "scriptpool.testing._embedded_redis",
    "free_port": "scriptpool.testing._embedded_redis",
    "local_pool": "scriptpool.testing._local_pool",
    "make_registry": "scriptpool.testing._registry",
    "percentiles": "scriptpool.testing._measure",
    "rss_mb": "scriptpool.testing._measure",
    "worker_argv": "scriptpool.workers",
}

__all__ = [
    "TRIVIAL_WAT",
    "CpuMeter",
    "EmbeddedRedis",
    "EmbeddedSentinelSet",
    "find_redis_server",
    "free_port",
    "local_pool",
    "make_registry",
    "percentiles",
    "rss_mb",
    "worker_argv",
]

__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
