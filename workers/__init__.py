"""Workers: the sharded Celery pool around the runtime (``scriptpool.runtime``). A worker takes
its shards' jobs, runs them on the runtime's ``Executor``, pushes the replies, and serves what
the outside sees of it: Prometheus metrics, log events, its heartbeat, captured runs (through
the runtime's ``CaptureWriter``) and a rollout's shadow runs.

``celery -A scriptpool.workers worker`` finds the app in ``scriptpool.workers.celery``;
:func:`worker_argv` is that command line for given shards.

Each name is imported on first use, so that ``scriptpool worker`` builds its command line
without loading Celery, which the command it execs loads anyway.
"""

from __future__ import annotations

from scriptpool._lazy import lazy_exports

TYPE_CHECKING = False
if TYPE_CHECKING:
    from scriptpool.workers._app import create_app
    from scriptpool.workers._argv import worker_argv

_HOMES = {"create_app": "scriptpool.workers._app", "worker_argv": "scriptpool.workers._argv"}

__all__ = ["create_app", "worker_argv"]

__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
