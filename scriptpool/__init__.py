"""scriptpool: untrusted checkout scripts (WebAssembly) run out of process on a sharded pool.

The host API is here::

    from scriptpool import Client, Settings

    with Client(Settings.from_env()) as client:
        outcome = client.run("discount", 1234, cart, timeout=0.05, fallback={"discounts": []})

Everything else lives in one subpackage per layer, each importing only those below it:
``scriptpool.config`` (the shared core: settings, keys, errors, wire types), ``engine`` (wasmtime),
``registry`` (deploy), ``runtime`` (a job run in process), ``workers`` (the Celery pool;
``celery -A scriptpool.workers worker``), ``producer`` (the host side, which needs only the core)
and ``cli`` (the ``scriptpool`` command). ``scriptpool.testing`` holds what tests of a host need.

Each name below is imported on first use, so that ``import scriptpool.engine`` or
``scriptpool --version`` does not load redis-py behind the client.
"""

from __future__ import annotations

from scriptpool._lazy import lazy_exports

# Not ``typing.TYPE_CHECKING``: importing typing is a cost ``--version`` need not pay, and mypy
# treats any constant of this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from scriptpool.config import Limits, Settings, errors
    from scriptpool.config.errors import ScriptpoolError
    from scriptpool.producer import BatchPolicy, BreakerPolicy, Client, DataStore, Outcome, Timings
    from scriptpool.registry import Registry

# Where each public name lives.
_HOMES = {
    "BatchPolicy": "scriptpool.producer",
    "BreakerPolicy": "scriptpool.producer",
    "Client": "scriptpool.producer",
    "DataStore": "scriptpool.producer",
    "Limits": "scriptpool.config",
    "Outcome": "scriptpool.producer",
    "Registry": "scriptpool.registry",
    "ScriptpoolError": "scriptpool.config.errors",
    "Settings": "scriptpool.config",
    "Timings": "scriptpool.producer",
    "errors": "scriptpool.config",
}

__all__ = [
    "BatchPolicy",
    "BreakerPolicy",
    "Client",
    "DataStore",
    "Limits",
    "Outcome",
    "Registry",
    "ScriptpoolError",
    "Settings",
    "Timings",
    "errors",
]

__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
