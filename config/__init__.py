"""The shared core: settings, limits, Redis keys and connections, names, errors and wire types.

Everything else imports from here; this package imports nothing of ours.
"""

from config import errors
from config._captured import (
    CAPTURE_FORMAT,
    PART_CHAIN,
    PART_JOIN,
    PART_REDUCER,
    PART_SINGLE,
    CapturedRun,
)
from config._environment import VARIABLES, Variable, markdown_table
from config._extension_points import (
    CHAIN,
    JOIN,
    MAX_APPS,
    REDUCER_APP,
    SINGLE,
    ExtensionPoint,
    ExtensionPointReader,
)
from config._groups import ShardGroup, parse_shard_groups, ranges_text, render_shard_groups
from config._heartbeats import WorkerHeartbeat, live_workers, shard_count_disagreement
from config._keys import Keys
from config._limits import Limits, check_input_size
from config._logging import EventLogger, configure_logging, get_logger
from config._names import check_app, check_ep, check_export, check_provider, check_shop_id
from config._reconnect import Reconnector
from config._redis import (
    PrimaryCheck,
    SentinelURL,
    WriteSession,
    celery_broker,
    check_redis_url,
    describe_redis_url,
    is_sentinel,
    parse_sentinel_url,
    primary_address,
    redact,
    redis_client,
    redis_pool,
    redis_tls_options,
)
from config._scale import (
    MAX_SCALE_FACTOR,
    check_scale_rules,
    largest_input_bytes,
    parse_scale_rule,
    scale_factor,
    scaled_limits,
)
from config._settings import Settings
from config._sharding import jump_hash, shard_for
from config._wire import (
    BODY_ENCODING,
    CONTENT_ENCODING,
    CONTENT_TYPE,
    PART_ERROR,
    PART_OK,
    PART_SKIPPED,
    ErrorInfo,
    Execution,
    ExecutionReport,
    Job,
    Part,
    Reply,
    Taken,
    encode_input,
    redis_command,
)

__all__ = [
    "BODY_ENCODING",
    "CAPTURE_FORMAT",
    "CHAIN",
    "CONTENT_ENCODING",
    "CONTENT_TYPE",
    "JOIN",
    "MAX_APPS",
    "MAX_SCALE_FACTOR",
    "PART_CHAIN",
    "PART_ERROR",
    "PART_JOIN",
    "PART_OK",
    "PART_REDUCER",
    "PART_SINGLE",
    "PART_SKIPPED",
    "REDUCER_APP",
    "SINGLE",
    "VARIABLES",
    "CapturedRun",
    "ErrorInfo",
    "EventLogger",
    "Execution",
    "ExecutionReport",
    "ExtensionPoint",
    "ExtensionPointReader",
    "Job",
    "Keys",
    "Limits",
    "Part",
    "PrimaryCheck",
    "Reconnector",
    "Reply",
    "SentinelURL",
    "Settings",
    "ShardGroup",
    "Taken",
    "Variable",
    "WorkerHeartbeat",
    "WriteSession",
    "celery_broker",
    "check_app",
    "check_ep",
    "check_export",
    "check_input_size",
    "check_provider",
    "check_redis_url",
    "check_scale_rules",
    "check_shop_id",
    "configure_logging",
    "describe_redis_url",
    "encode_input",
    "errors",
    "get_logger",
    "is_sentinel",
    "jump_hash",
    "largest_input_bytes",
    "live_workers",
    "markdown_table",
    "parse_scale_rule",
    "parse_sentinel_url",
    "parse_shard_groups",
    "primary_address",
    "ranges_text",
    "redact",
    "redis_client",
    "redis_command",
    "redis_pool",
    "redis_tls_options",
    "render_shard_groups",
    "scale_factor",
    "scaled_limits",
    "shard_count_disagreement",
    "shard_for",
]
