"""A Celery result backend that pushes each result onto the caller's reply list.

Why not the stock Redis backend: it subscribes to one pub/sub channel per task and does not
always unsubscribe (celery#5320, #4857), its consumer is not thread-safe and not drained
(#6963), and ``get()`` can hang after a Redis restart (#4670). Here a worker RPUSHes the result
onto the list named by the task's ``reply_to`` (one list per client process, with a TTL), and the
client reads it with one BLPOP loop: no subscriptions, and no key per call.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import msgpack
import redis
from celery import states
from celery.backends.base import BaseBackend

from config import Reply
from workers._app import REPLY_TTL_S


class ReplyListBackend(BaseBackend):  # type: ignore[misc]
    """Stores a task's result by pushing it to ``request.reply_to``; nothing else is stored."""

    supports_native_join = False
    persistent = False

    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        settings = app.settings
        self._reply_prefix = settings.keys.replies("")
        self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=1)

    def _store_result(
        self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None, **_: Any
    ) -> Any:
        reply_to = getattr(request, "reply_to", None)
        if not reply_to or not reply_to.startswith(self._reply_prefix):
            return result  # nobody is waiting, or a foreign reply_to we will not write to
        if state == states.SUCCESS:
            payload = result
        elif state == states.FAILURE:
            payload = _failure_reply(task_id, result, request)
        else:
            return result
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(reply_to, msgpack.packb(payload, use_bin_type=True))
            pipe.expire(reply_to, REPLY_TTL_S)
            pipe.execute()
        return result

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        return {"status": states.PENDING, "result": None, "task_id": task_id}

    def _forget(self, task_id: str) -> None:
        pass


def _failure_reply(task_id: str, exc: Any, request: Any) -> dict[str, Any]:
    now = time.time()
    return Reply(
        job_id=task_id,
        execution=None,
        error={"code": getattr(exc, "code", "worker_error"), "message": f"{type(exc).__name__}: {exc}"},
        shard=-1,
        worker=f"{getattr(request, 'hostname', None) or socket.gethostname()}:{os.getpid()}",
        received_at=now,
        finished_at=now,
    ).to_wire()
