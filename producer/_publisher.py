"""A direct publisher of Celery task messages: one LPUSH per message, no ``send_task``.

``send_task`` made the enqueue stage cost 0.8 to 1.7 ms p50 in ``scriptpool bench``; this
publisher costs 0.2 ms, a Redis round trip included. ``send_task`` spends that on work this pool
never needs per call: a producer from a pool, routing, the ``saferepr`` of the arguments, publish
retry wrappers, signals, and redis-py's per-command layers. Our queues are plain Redis lists
whose names are fixed (``scriptpool.config.Keys.queue``), so this module writes the same message kombu's
Redis transport writes: the protocol v2 headers and properties of
``celery.app.amqp.AMQP.as_task_v2``, a msgpack body (``[args, kwargs, embed]``) base64-encoded as
``kombu.transport.virtual.Channel`` encodes it, all in kombu's JSON envelope, pushed with the
LPUSH of ``kombu.transport.redis.Channel._put`` onto the list of priority 0 (the queue name itself).

``tests/test_publisher.py`` compares this envelope with ``send_task``'s field by field and has a
real worker consume it, so a Celery or kombu upgrade that changes the format fails a test.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
from json.encoder import encode_basestring_ascii as _quote  # what json.dumps uses
from typing import Any

import msgpack
import redis

from scriptpool.config.wire import BODY_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, redis_command

# What kombu's Redis transport sets for a publish on the default (anonymous) exchange.
DELIVERY_MODE = 2  # persistent, kombu's default
PRIORITY = 0  # the default: kombu pushes priority 0 onto the bare queue name
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class TaskPublisher:
    """Builds Celery protocol-2 messages for one task and LPUSHes them onto a queue list.

    Thread-safe: it keeps no per-call state, and redis-py's connection pool is thread-safe.
    """

    def __init__(self, client: redis.Redis, task_name: str, *, origin: str | None = None) -> None:
        self._redis = client
        self.task_name = task_name
        self.origin = origin or anonymous_nodename()
        self._template = _Template(self)

    def message(
        self,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        queue: str,
        reply_to: str,
        argsrepr: str,
    ) -> dict[str, Any]:
        """The envelope kombu would store for ``send_task(task_name, args, queue=queue, ...)``.

        ``argsrepr`` is what Flower and Celery's logs show for the arguments. We pass a short
        description instead of ``saferepr(args)``: cheaper, and host inputs stay out of logs.
        """
        return self._message(
            task_id, _body(args, kwargs), queue, reply_to, argsrepr, _kwargsrepr(kwargs), _tag()
        )

    def _message(
        self,
        task_id: str,
        body: str,
        queue: str,
        reply_to: str,
        argsrepr: str,
        kwargsrepr: str,
        delivery_tag: str,
    ) -> dict[str, Any]:
        return {
            "body": body,
            "content-encoding": CONTENT_ENCODING,
            "content-type": CONTENT_TYPE,
            "headers": {
                "lang": "py",
                "task": self.task_name,
                "id": task_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": task_id,
                "parent_id": None,
                "argsrepr": argsrepr,
                "kwargsrepr": kwargsrepr,
                "origin": self.origin,
                "ignore_result": None,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": reply_to,
                "delivery_mode": DELIVERY_MODE,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": PRIORITY,
                "body_encoding": BODY_ENCODING,
                "delivery_tag": delivery_tag,
            },
        }

    def encode(
        self,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        queue: str,
        reply_to: str,
        argsrepr: str,
        headers: dict[str, str] | None = None,
    ) -> str:
        """``json.dumps(self.message(...))``, from a template: 18 us instead of 29. ``headers``:
        more message headers (a traced call's ``traceparent``, ``tracestate``), which the
        template has no place for: such a message is built whole."""
        if headers:  # (ours are never replaced)
            message = self.message(task_id, args, kwargs, queue=queue, reply_to=reply_to, argsrepr=argsrepr)
            message["headers"] = {**headers, **message["headers"]}
            return json.dumps(message)
        return self._template.fill(
            id=task_id,
            body=_body(args, kwargs),
            queue=queue,
            reply_to=reply_to,
            argsrepr=argsrepr,
            kwargsrepr=_kwargsrepr(kwargs),
            delivery_tag=_tag(),
        )

    def publish(
        self,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        queue: str,
        reply_to: str,
        argsrepr: str,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Build the message and LPUSH it: one Redis round trip, no retry (the caller's deadline
        decides), raising ``redis.RedisError`` or ``OSError`` when Redis cannot take it.

        ``timeout``: wait at most this long for Redis to acknowledge (the caller's remaining time),
        so a Redis that froze with the connection open costs the caller its deadline, not the
        socket timeout; the connection is then dropped. ``headers``: see :meth:`encode`."""
        envelope = self.encode(
            task_id, args, kwargs, queue=queue, reply_to=reply_to, argsrepr=argsrepr, headers=headers
        )
        packed = redis_command(b"LPUSH", queue, envelope)
        # A pooled connection and a packed command: a third of redis-py's per-command CPU.
        pool = self._redis.connection_pool
        connection: Any = pool.get_connection()  # redis-py types these partly
        try:
            connection.send_packed_command([packed], check_health=False)
            if timeout is None:
                connection.read_response()
            else:
                connection.read_response(timeout=timeout)
        except BaseException:
            connection.disconnect()  # a half-read reply must not reach the next user
            raise
        finally:
            pool.release(connection)


def anonymous_nodename() -> str:
    """What Celery's ``anon_nodename()`` names a producer (``gen<pid>@<host>``), without importing
    Celery into the host."""
    return f"gen{os.getpid()}@{socket.gethostname()}"


def _body(args: list[Any], kwargs: dict[str, Any]) -> str:
    """Celery's body ``[args, kwargs, embed]`` in msgpack, base64-encoded as kombu's channel does."""
    return base64.b64encode(msgpack.packb([args, kwargs, _EMBED], use_bin_type=True)).decode("ascii")


def _kwargsrepr(kwargs: dict[str, Any]) -> str:
    # saferepr(kwargs) for the flat dicts of plain values we send, as send_task would write it.
    return repr(kwargs)


def _tag() -> str:
    # kombu's delivery tags are uuid4 strings; any unique string serves (it keys the worker's
    # in-memory QoS table), and 16 random bytes cost a third of uuid.uuid4().
    return os.urandom(16).hex()


class _Template:
    """The envelope's JSON with its variable strings cut out, made by ``json.dumps`` itself so
    the two cannot drift apart."""

    FIELDS = ("id", "body", "queue", "reply_to", "argsrepr", "kwargsrepr", "delivery_tag")

    def __init__(self, publisher: TaskPublisher) -> None:
        marks = {name: f"@@{name}@@" for name in self.FIELDS}
        text = json.dumps(
            publisher._message(
                marks["id"], marks["body"], marks["queue"], marks["reply_to"], marks["argsrepr"],
                marks["kwargsrepr"], marks["delivery_tag"],
            )
        )  # fmt: skip
        pattern = "(" + "|".join(re.escape(json.dumps(mark)) for mark in marks.values()) + ")"
        pieces = re.split(pattern, text)
        by_mark = {json.dumps(mark): name for name, mark in marks.items()}
        # Even positions are literal JSON, odd positions name the field that goes there.
        self._literals = pieces[0::2]
        self._fields = [by_mark[piece] for piece in pieces[1::2]]

    def fill(self, **values: str) -> str:
        encoded = {name: _quote(value) for name, value in values.items()}
        out = [self._literals[0]]
        for field, literal in zip(self._fields, self._literals[1:], strict=True):
            out.append(encoded[field])
            out.append(literal)
        return "".join(out)
