"""Settings, limits, Redis key names, name checks and errors shared by every subsystem."""

from config import errors
from config._embedded_redis import EmbeddedRedis, find_redis_server
from config._keys import Keys
from config._limits import Limits
from config._logging import configure_logging
from config._names import check_ep, check_export, check_provider, check_shop_id
from config._settings import ENVIRONMENT, Settings
from config._sharding import jump_hash, shard_for
from config._wire import TASK_NAME, Job, Reply, encode_input

__all__ = [
    "ENVIRONMENT",
    "TASK_NAME",
    "EmbeddedRedis",
    "Job",
    "Keys",
    "Limits",
    "Reply",
    "Settings",
    "check_ep",
    "check_export",
    "check_provider",
    "check_shop_id",
    "configure_logging",
    "encode_input",
    "errors",
    "find_redis_server",
    "jump_hash",
    "shard_for",
]
