"""kombu's Redis transport, with a message it cannot read refused instead of stopping the worker.

kombu parses each message it pops with ``kombu.utils.json.loads`` before Celery sees it. A
message that is not JSON, or JSON nested deeper than Python recurses (``"[" * 100_000``), makes
that raise inside the consumer's event loop, which Celery treats as unrecoverable: the worker
exits, and anyone who can write to a shard's queue could stop the shard. Here the transport's
``loads`` is wrapped: what it cannot parse becomes a placeholder message with no task and a
content type nobody accepts, which Celery's consumer logs and discards like any undecodable
message (``scriptpool.workers._strategy`` does the same for the messages kombu can parse).

The transport module's name is rebound once per process; nothing else of kombu is changed.
"""

from __future__ import annotations

import os
from typing import Any

import kombu.transport.redis as redis_transport

from scriptpool.config import get_logger

log = get_logger("worker")

UNREADABLE_CONTENT_TYPE = "application/x-scriptpool-unreadable"
_transport: Any = redis_transport  # kombu does not export the name it parses with
_original_loads = _transport.loads


def guarded_loads(text: Any, *args: Any, **kwargs: Any) -> Any:
    """kombu's ``loads``; for text it cannot parse, a placeholder message that is refused."""
    try:
        return _original_loads(text, *args, **kwargs)
    except Exception as exc:  # RecursionError too
        log.warning("security_message_refused", queue=None, problem=f"unreadable: {type(exc).__name__}")
        return unreadable_message()


def unreadable_message() -> dict[str, Any]:
    """What an unparseable message is delivered as: no task header, an empty body of a content
    type no consumer accepts."""
    return {
        "body": "",
        "content-encoding": "binary",
        "content-type": UNREADABLE_CONTENT_TYPE,
        "headers": {},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": os.urandom(16).hex(),
            "delivery_info": {"exchange": "", "routing_key": ""},
            "priority": 0,
        },
    }


def install() -> None:
    """Guard the Redis transport's parsing in this process (idempotent)."""
    _transport.loads = guarded_loads
