"""The worker entry point: ``celery -A scriptpool.workers worker -Q <shard queues>``.

Settings come from ``SCRIPTPOOL_*`` variables when the worker first needs them, not at import.
"""

from scriptpool.workers._app import create_app

app = create_app()

__all__ = ["app"]
