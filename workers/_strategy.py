"""The execute task's Celery strategy: refuse any message that is not a well-formed msgpack job.

``accept_content=["msgpack"]`` keeps pickle out, but kombu trusts two raw content types
(``application/data`` and ``application/text``) past it, and Celery's default strategy then
evaluates ``'args' in message.payload`` on raw bytes: a ``TypeError`` that Celery treats as
unrecoverable, so the worker exits, and the message, put back, kills the next one. Anyone who
can write to Redis could stop a shard. Here every message is checked before the default
strategy sees it; a bad one raises ``InvalidTaskError``, which Celery's consumer answers by
logging and rejecting that one message and carrying on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.worker.strategy import default
from kombu.exceptions import ContentDisallowed, DecodeError

from scriptpool.config import get_logger
from scriptpool.config.wire import CONTENT_TYPE

log = get_logger("worker")


def well_formed_problem(message: Any) -> str | None:
    """Why ``message`` is not a protocol-2 msgpack task message, or None if it is one."""
    if message.content_type != CONTENT_TYPE:
        return f"content type {message.content_type!r}"
    headers = message.headers
    if not isinstance(headers, dict) or not isinstance(headers.get("id"), str):
        return "no task id in the headers"
    try:
        payload = message.decode()  # kombu caches it; the request reuses the decoded body
    except (DecodeError, ContentDisallowed) as exc:
        return f"body does not decode: {exc}"
    if not (
        isinstance(payload, (list, tuple))
        and len(payload) == 3
        and isinstance(payload[0], (list, tuple))
        and isinstance(payload[1], dict)
        and isinstance(payload[2], dict)
    ):
        return "body is not [args, kwargs, embed]"
    return None


def guarded(task: Any, app: Any, consumer: Any, **options: Any) -> Callable[..., Any]:
    """Celery's default strategy for ``task``, behind :func:`well_formed_problem`."""
    handle = default(task, app, consumer, **options)

    def handle_checked(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        problem = well_formed_problem(message)
        if problem is not None:
            queue = (message.delivery_info or {}).get("routing_key")
            log.warning("security_message_refused", queue=queue, problem=problem)
            raise InvalidTaskError(f"refused a message on {queue}: {problem}")
        return handle(message, body, *args, **kwargs)

    return handle_checked
