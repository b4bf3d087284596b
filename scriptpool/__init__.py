"""The ``scriptpool`` command-line tool, and the demo, bench and local pool it runs.

It sits on top of every other package and is the only one that imports them all. Besides
``main``, it offers what the benchmark scripts and tests share: a private Redis, a local pool,
a private Sentinel set, the bench's trivial script, and measuring helpers.
"""

from scriptpool._bench import TRIVIAL_WAT
from scriptpool._cli import main
from scriptpool._embedded_redis import EmbeddedRedis, find_redis_server, free_port
from scriptpool._embedded_sentinel import EmbeddedSentinelSet
from scriptpool._local_pool import local_pool
from scriptpool._measure import percentiles, rss_mb

__all__ = [
    "TRIVIAL_WAT",
    "EmbeddedRedis",
    "EmbeddedSentinelSet",
    "find_redis_server",
    "free_port",
    "local_pool",
    "main",
    "percentiles",
    "rss_mb",
]
