"""Settings, limits, Redis key names, name checks and errors shared by every subsystem."""

from config import errors
from config._embedded_redis import EmbeddedRedis, embedded_or_configured, find_redis_server
from config._keys import Keys
from config._limits import Limits
from config._names import check_ep, check_export, check_provider, check_shop_id
from config._settings import Settings

__all__ = [
    "EmbeddedRedis",
    "Keys",
    "Limits",
    "Settings",
    "check_ep",
    "check_export",
    "check_provider",
    "check_shop_id",
    "embedded_or_configured",
    "errors",
    "find_redis_server",
]
