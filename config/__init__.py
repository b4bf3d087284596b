"""The shared core: what every layer needs (settings, limits, keys, names, sharding, errors and
logging); everything else imports from here, and this package imports nothing of ours.

The names here are those used on more than one side (engine, registry, workers, producer, the
command-line tool):

* settings: :class:`Settings`, :class:`Limits`, :class:`Keys` (every Redis key),
  :class:`ShardGroup`, :class:`ExtensionPoint` and its cached :class:`ExtensionPointReader`;
* checks of what a caller passes: :func:`check_shop_id`, :func:`check_ep`, :func:`check_app`,
  :func:`check_export`, :func:`check_provider`, :func:`check_input_size`, :func:`check_integer`;
* routing and sizing a call: :func:`shard_for`, :func:`scale_factor`, :func:`scaled_limits`,
  :func:`largest_input_bytes`;
* :mod:`errors` (every named error), :func:`get_logger`, :func:`configure_logging`,
  :class:`EventLogger`, :func:`event_name`.

The rest is in public submodules, one subject each (their own ``__all__`` says what they offer),
so that an import says which part of the core a module touches:

* ``scriptpool.config.redis``: connections (clients, pools, Sentinel, TLS, the Celery broker,
  durable writes, the reconnect loop);
* ``scriptpool.config.wire``: what crosses the queue (``Job``, ``Reply``, ``Execution``, ...);
* ``scriptpool.config.heartbeats``: worker heartbeats and who is live;
* ``scriptpool.config.environment``: the table of ``SCRIPTPOOL_*`` variables;
* ``scriptpool.config.quotas``: quotas per shop and per app (the model, its storage, the
  atomic scripts that enforce it, what is in use now);
* ``scriptpool.config.errors``, ``.settings``, ``.limits``, ``.scale``, ``.groups``,
  ``.extension_points``, ``.sharding``: the names above and what only one side needs of their
  subject (the artifact key's checks, the limits' ranges, scale rules, the shard-groups text,
  the combine kinds, ``jump_hash``).

Modules whose names start with ``_`` are private to this package.
"""

from scriptpool.config import errors
from scriptpool.config._keys import Keys
from scriptpool.config._logging import EventLogger, configure_logging, event_name, get_logger
from scriptpool.config._names import (
    check_app,
    check_ep,
    check_export,
    check_integer,
    check_provider,
    check_shop_id,
)
from scriptpool.config.extension_points import ExtensionPoint, ExtensionPointReader
from scriptpool.config.groups import ShardGroup
from scriptpool.config.limits import Limits, check_input_size
from scriptpool.config.scale import largest_input_bytes, scale_factor, scaled_limits
from scriptpool.config.settings import Settings
from scriptpool.config.sharding import shard_for

__all__ = [
    "EventLogger",
    "ExtensionPoint",
    "ExtensionPointReader",
    "Keys",
    "Limits",
    "Settings",
    "ShardGroup",
    "check_app",
    "check_ep",
    "check_export",
    "check_input_size",
    "check_integer",
    "check_provider",
    "check_shop_id",
    "configure_logging",
    "errors",
    "event_name",
    "get_logger",
    "largest_input_bytes",
    "scale_factor",
    "scaled_limits",
    "shard_for",
]
