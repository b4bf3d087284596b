"""The ``scriptpool`` command-line tool, and the demo, bench and local pool it runs.

It sits on top of every other package and is the only one that imports them all. Besides
``main``, it offers what the benchmark scripts and tests share: a private Redis, a local pool,
a private Sentinel set, the bench's trivial script, and measuring helpers.

Each name is imported on first use: every ``scriptpool`` command imports this package first, and
importing the bench and the local pool here (with producer and redis-py behind them) would cost
``scriptpool --version`` a few hundred milliseconds.
"""

from __future__ import annotations

import importlib

# Not ``typing.TYPE_CHECKING``: importing typing is a cost ``--version`` need not pay, and mypy
# treats any constant of this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from scriptpool.cli._bench import TRIVIAL_WAT
    from scriptpool.cli._cli import main
    from scriptpool.cli._embedded_redis import EmbeddedRedis, find_redis_server, free_port
    from scriptpool.cli._embedded_sentinel import EmbeddedSentinelSet
    from scriptpool.cli._local_pool import local_pool
    from scriptpool.cli._measure import percentiles, rss_mb

# Where each public name lives.
_HOMES = {
    "TRIVIAL_WAT": "scriptpool.cli._bench",
    "EmbeddedRedis": "scriptpool.cli._embedded_redis",
    "EmbeddedSentinelSet": "scriptpool.cli._embedded_sentinel",
    "find_redis_server": "scriptpool.cli._embedded_redis",
    "free_port": "scriptpool.cli._embedded_redis",
    "local_pool": "scriptpool.cli._local_pool",
    "main": "scriptpool.cli._cli",
    "percentiles": "scriptpool.cli._measure",
    "rss_mb": "scriptpool.cli._measure",
}

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


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'scriptpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
