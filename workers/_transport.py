"""kombu's Redis transport, with a message it cannot read refused instead of stopping the worker.

kombu parses each message it pops with ``kombu.utils.json.loads`` before Celery sees it, then
indexes into it (``payload['properties']['delivery_tag']``). A message that is not JSON, JSON
nested deeper than Python recurses (``"[" * 100_000``), or JSON of another shape (``"[]"``,
``"null"``, ``{"properties": 1}``) makes that raise inside the consumer's event loop, which
Celery treats as unrecoverable (or, for a missing key, as a lost broker connection): the worker
exits or reconnects, and anyone who can write to a shard's queue could stop the shard. Here the transport's
``loads`` is wrapped: what it cannot parse becomes a placeholder message with no task and a
content type nobody accepts, which Celery's consumer logs and discards like any undecodable
message (``scriptpool.workers._strategy`` does the same for the messages kombu can parse).

The transport module's name is rebound once per process; nothing else of kombu is changed.
kombu parses with it what it restores of unacknowledged messages too (a ``[message, exchange,
routing key]`` list, refused here): those paths run only with ack emulation, which our workers
turn off (``scriptpool.workers._app``).
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
    """kombu's ``loads``; for text it cannot parse, or that is not a message kombu can build
    (``"[]"``, ``"null"``, no ``properties`` map with a ``delivery_tag``: kombu would index into
    it in the consumer's loop and stop the worker), a placeholder message that is refused."""
    try:
        parsed = _original_loads(text, *args, **kwargs)
    except Exception as exc:  # RecursionError too
        return _refused(f"unreadable: {type(exc).__name__}")
    problem = _shape_problem(parsed)
    return parsed if problem is None else _refused(problem)


def _shape_problem(parsed: Any) -> str | None:
    if type(parsed) is not dict:
        return f"a {type(parsed).__name__}, not a message"
    properties = parsed.get("properties")
    if type(properties) is not dict or "delivery_tag" not in properties:
        return "no properties with a delivery tag"
    for outer, name in ((parsed, "headers"), (properties, "delivery_info")):
        if outer.get(name) is not None and type(outer.get(name)) is not dict:
            return f"{name} is not a map"
    return None


def _refused(problem: str) -> dict[str, Any]:
    log.warning("security_message_refused", queue=None, problem=problem)
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
