"""A task message read off a shard's queue by the worker's own loop (not by Celery): the kombu
envelope ``scriptpool.producer._publisher`` writes, checked as strictly as
``scriptpool.workers._strategy`` checks what Celery delivers. Anyone who can write to Redis can
push anything onto a queue: a message that is not one of ours is logged and dropped, never
raised on."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import msgpack

from scriptpool.config import Keys, get_logger
from scriptpool.config.wire import BODY_ENCODING, CONTENT_TYPE
from scriptpool.workers._backend import valid_reply_to

log = get_logger("worker")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One task message's jobs and where their replies go."""

    jobs: tuple[Any, ...]
    reply_to: str | None
    announce: bool
    shard: int


def decode_envelope(raw: bytes | str, queue: str, shard: int) -> Delivery | None:
    """The delivery a raw message of ``queue`` holds, or None (logged) if it is not one of our
    task messages: the same checks Celery's path makes (``scriptpool.workers._strategy``)."""
    problem, delivery = _decode(raw, shard)
    if problem is not None:
        log.warning("security_message_refused", queue=queue, problem=problem)
        return None
    return delivery


def _decode(raw: bytes | str, shard: int) -> tuple[str | None, Delivery | None]:
    try:
        envelope = json.loads(raw)
    except Exception as exc:  # RecursionError too: '[' nested 100,000 deep is valid JSON's start
        return f"not a JSON envelope: {type(exc).__name__}: {str(exc)[:100]}", None
    if type(envelope) is not dict:
        return "not a JSON envelope", None
    headers, properties = envelope.get("headers"), envelope.get("properties")
    if type(headers) is not dict or type(properties) is not dict:
        return "no headers or properties", None
    if envelope.get("content-type") != CONTENT_TYPE:
        return f"content type {str(envelope.get('content-type'))[:64]!r}", None
    if headers.get("task") != Keys.TASK or type(headers.get("id")) is not str:
        return "not an execute task message with an id", None
    body = envelope.get("body")
    if properties.get("body_encoding") != BODY_ENCODING or type(body) is not str:
        return "body is not base64 text", None
    try:
        payload = msgpack.unpackb(base64.b64decode(body, validate=True), raw=False)
    except Exception as exc:  # binascii, msgpack's, or anything a hostile body finds
        return f"body does not decode: {type(exc).__name__}: {str(exc)[:100]}", None
    if not (
        type(payload) is list
        and len(payload) == 3
        and type(payload[0]) is list
        and type(payload[1]) is dict
        and type(payload[2]) is dict
    ):
        return "body is not [args, kwargs, embed]", None
    reply_to = properties.get("reply_to")
    if reply_to is not None and not valid_reply_to(reply_to):
        return "reply_to is not a reply list's name", None
    announce = payload[1].get("announce", False)
    return None, Delivery(
        tuple(payload[0]),
        reply_to if type(reply_to) is str else None,
        announce is True,
        shard,
    )
