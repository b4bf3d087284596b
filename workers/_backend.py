"""How replies reach callers: pushed onto the caller's reply list, never stored anywhere else.

Why not the stock Redis backend: it subscribes to one pub/sub channel per task and does not
always unsubscribe (celery#5320, #4857), its consumer is not thread-safe and not drained
(#6963), and ``get()`` can hang after a Redis restart (#4670). Here a worker RPUSHes each reply
onto the list named by the message's ``reply_to`` (one list per client process, with a TTL), and
the client reads it with one BLPOP loop: no subscriptions, and no key per call.

The execute task pushes its replies itself (:class:`ReplyPusher`) and returns nothing, so
Celery's result path (a ``saferepr`` of the return value and the backend's store, measured
0.3 ms per task together) stays off the hot path. :class:`ReplyListBackend` remains Celery's
result backend for what escapes the task: an exception raised outside any job is pushed as a
``worker_error`` reply for the message's task id.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import redis
from celery import states
from celery.backends.base import BaseBackend

from scriptpool.config import Keys, Settings, get_logger
from scriptpool.config.errors import WorkerFailed
from scriptpool.config.redis import redis_pool
from scriptpool.config.wire import ErrorInfo, Reply, redis_command

log = get_logger("worker")


class ReplyPusher:
    """Pushes replies (msgpack) onto callers' reply lists and keeps each list's TTL fresh."""

    def __init__(self, settings: Settings) -> None:
        self._prefix = settings.keys.replies("")
        self._pool = redis_pool(settings.redis_url, timeout=2, connect_timeout=1)

    def accepts(self, reply_to: str | None) -> bool:
        """True for one of our reply lists; a foreign ``reply_to`` is never written to."""
        return valid_reply_to(reply_to) and reply_to.startswith(self._prefix)  # type: ignore[union-attr]

    @contextmanager
    def session(self, reply_to: str | None) -> Iterator[ReplySession]:
        """Replies to one message's caller, sent when :meth:`ReplySession.send` says (or when the
        session ends); Redis's acknowledgements are read when the session ends, so a batch never
        waits for a round trip between its jobs. Nothing is written for a foreign or missing
        ``reply_to``."""
        session = ReplySession(self._pool, reply_to if self.accepts(reply_to) else None)
        try:
            yield session
        finally:
            session.close()

    def push(self, reply_to: str | None, reply: dict[str, Any]) -> None:
        """Push one reply and wait for Redis to take it."""
        with self.session(reply_to) as session:
            session.push(reply)


# How long a worker waits for the answer to its pull's RPOP (kombu's own BRPOP waits forever).
POP_PATIENCE_S = 60.0


def _queue_name(key: Any) -> str | None:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else key if isinstance(key, str) else None


# Whether Redis knows BLMPOP (7.0 and later), until it says it does not.
_blmpop = True
# Ours are the prefix and 32 hex digits; a longer name is not one of ours.
_MAX_REPLY_TO = 256


def valid_reply_to(reply_to: object) -> bool:
    """Whether ``reply_to`` can name a reply list at all: printable ASCII, 1 to 256 characters
    (a message's ``reply_to`` is anyone's text; a lone surrogate would fail to encode)."""
    return (
        type(reply_to) is str
        and 0 < len(reply_to) <= _MAX_REPLY_TO
        and reply_to.isascii()
        and reply_to.isprintable()
    )


class ReplySession:
    """One pooled connection, held while a message's replies go out (see ReplyPusher.session).

    Replies are held until :meth:`send` (or a :meth:`pop`, or the end of the session), then go
    out together: one ``RPUSH`` of all of them and one ``EXPIRE``, in one write. A write is a
    system call that also wakes Redis: sent one by one, a batch's replies cost the worker more
    than running its jobs (``scriptpool.workers._serve`` decides when held replies must go)."""

    def __init__(self, pool: redis.ConnectionPool, reply_to: str | None) -> None:
        self._pool = pool
        self._key = reply_to.encode() if reply_to else None
        self._expire = redis_command(b"EXPIRE", self._key, str(Keys.REPLY_TTL_S)) if self._key else b""
        self._connection: Any = None  # redis-py types its connections partly
        self._unread = 0
        self._held: list[bytes] = []
        # When the oldest reply held was pushed (time.monotonic), inf while none is.
        self.held_since = math.inf
        # Send each reply as it is pushed (the worker has nothing else to run meanwhile).
        self.eager = False
        self._popping: str | None = None  # the queue of a pop begun whose answer is unread
        self._popped: list[Any] | None = None  # its answer, read before a write, for pop_end

    def push(self, reply: dict[str, Any]) -> None:
        """Hold ``reply`` until the next :meth:`send` (no I/O), or send it now if :attr:`eager`."""
        if self._key is None:
            return
        try:
            body = msgpack.packb(reply, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            # A value the wire cannot carry (output decoding refuses those it knows of): this
            # caller hears the worker failed, and the message's other jobs still run and reply.
            log.error("reply_unpackable", job=reply.get("job_id"), error=repr(exc))
            failure = failure_reply(str(reply.get("job_id")), exc, None, reply.get("shard", -1))
            body = msgpack.packb(failure, use_bin_type=True)
        if not self._held:
            self.held_since = time.monotonic()
        self._held.append(body)
        if self.eager:
            self.send()

    def send(self) -> None:
        """Send the replies held (``RPUSH`` + ``EXPIRE``) without waiting for Redis's answer. If
        Redis cannot take them now, they stay held (logged), for the next write or the end of
        the session: a job's reply is never lost to the moment it was ready."""
        if not self._held:
            return
        try:
            self._write([])
        except (redis.RedisError, OSError) as exc:
            log.warning("reply_delayed", key=self._key, replies=len(self._held), error=repr(exc)[:200])

    def pop_begin(self, queue: str, count: int) -> None:
        """Send ``RPOP queue count`` after the replies held, and go on: :meth:`pop_end` gives what
        it took. A worker runs a job while the round trip is under way, instead of waiting it
        out. A write on this session before then reads the pop's answer first (kept for
        :meth:`pop_end`), so that a write that fails cannot drop the answer with the connection."""
        if self._popping is not None or self._popped is not None:
            raise RuntimeError("a pop begun is ended before the next")
        self._write([redis_command(b"RPOP", queue, str(count))])
        self._popping = queue

    def pop_end(self) -> list[Any]:
        """The messages the pop begun took (waiting for its answer, as :meth:`pop` does). Raises
        ``redis.ConnectionError`` if the connection was lost before its answer was read."""
        if self._popped is not None:
            popped, self._popped = self._popped, None
            return popped
        if self._popping is None:
            raise redis.ConnectionError("the pull's connection was lost before its answer was read")
        return self._finish_pop()

    def _finish_pop(self) -> list[Any]:
        unread, self._unread = self._unread, 0
        popped = self._answer(unread)  # failing, it drops the connection and logs the loss
        self._popping = None
        return popped

    def pop(self, queue: str, count: int) -> list[Any]:
        """``RPOP queue count`` on this session's connection, after the replies held: they, their
        acknowledgements and the messages popped cost one round trip, so a worker that looks at
        its queue after a reply pays no round trip of its own for it."""
        return self._pop_with(redis_command(b"RPOP", queue, str(count)))

    def wait_pop(self, queues: list[str], count: int, timeout_s: float) -> tuple[str | None, list[Any]]:
        """After the replies held, up to ``count`` messages of the first of ``queues`` that has
        any, waiting up to ``timeout_s`` for one: (that queue, its messages), (None, []) if none
        came. ``BLMPOP`` (Redis 7), or ``BRPOP`` (one message) where the server does not know it."""
        global _blmpop
        timeout = f"{timeout_s:.3f}"
        if _blmpop:
            try:
                popped = self._pop_with(
                    redis_command(
                        b"BLMPOP", timeout, str(len(queues)), *queues, b"RIGHT", b"COUNT", str(count)
                    )
                )
            except redis.ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                _blmpop = False
            else:
                if len(popped) == 2 and isinstance(popped[1], list):
                    return _queue_name(popped[0]), popped[1]
                return None, []
        popped = self._pop_with(redis_command(b"BRPOP", *queues, timeout))
        return (_queue_name(popped[0]), popped[1:2]) if len(popped) == 2 else (None, [])

    def _pop_with(self, command: bytes) -> list[Any]:
        if self._popping is not None or self._popped is not None:
            raise RuntimeError("a pop begun is ended before the next")
        self._write([command])
        unread, self._unread = self._unread, 0
        return self._answer(unread)

    def _answer(self, acknowledgements: int) -> list[Any]:
        """Read ``acknowledgements`` answers, then a pop's. Once sent, the pop runs whenever
        Redis gets to it, and what it pops exists only in its answer: a paused Redis is waited
        for (up to POP_PATIENCE_S), never given up on after the socket's 2 s, which would leave
        those messages popped and unanswered."""
        try:
            deadline = time.monotonic() + POP_PATIENCE_S
            while not self._connection.can_read(timeout=0.5):
                if time.monotonic() >= deadline:
                    raise redis.TimeoutError(f"no answer to a pop in {POP_PATIENCE_S:.0f} s")
            self._read(acknowledgements)
            popped = self._connection.read_response()
        except BaseException:
            self._drop()
            raise
        return popped if isinstance(popped, list) else []

    def close(self) -> None:
        """Send what is held, read the acknowledgements and give the connection back. A pop
        begun is ended first by whoever began it: what it took would be lost here."""
        if self._popping is not None or self._popped is not None:
            log.error("pull_lost", queue=self._popping, messages=len(self._popped or ()))
            self._popped = None
            self._drop()  # an unread answer is not to be read as an acknowledgement
        if self._held:
            self._write([])
        if self._connection is None:
            return
        try:
            self._read_acknowledgements()
        except BaseException:
            self._drop()
            raise
        self._pool.release(self._connection)
        self._connection = None

    def _write(self, after: list[bytes]) -> None:
        """Send the held replies, then ``after`` (packed commands), in one write. The replies
        stay held unless it was sent."""
        if self._popping is not None:
            self._popped = self._finish_pop()
        commands = after
        if self._held:
            assert self._key is not None  # nothing is held for a session that writes nowhere
            commands = [redis_command(b"RPUSH", self._key, *self._held) + self._expire, *after]
        try:
            if self._connection is None:
                self._connection = self._pool.get_connection()
            # One bytes object: redis-py makes a system call per item of a list.
            self._connection.send_packed_command([b"".join(commands)], check_health=False)
        except BaseException:
            self._drop()
            raise
        if len(commands) > len(after):
            self._held = []
            self.held_since = math.inf
            self._unread += 2

    def _read_acknowledgements(self) -> None:
        unread, self._unread = self._unread, 0
        self._read(unread)

    def _read(self, acknowledgements: int) -> None:
        for _ in range(acknowledgements):
            try:
                self._connection.read_response()
            except redis.ResponseError as exc:  # e.g. the key is not a list: these replies are lost
                log.warning("reply_rejected", key=self._key, error=str(exc))

    def _drop(self) -> None:
        """Give the connection up (its unread answers with it); what is held stays held."""
        if self._connection is not None:
            self._connection.disconnect()  # half-read answers must not reach the next user
            self._pool.release(self._connection)
        if self._popping is not None:
            log.error("pull_lost", queue=self._popping, messages="unknown")
        self._connection = None
        self._unread = 0
        self._popping = None


class ReplySessions:
    """A loop's reply sessions, one per caller's list, all closed (what they hold sent) at its
    end. Called with a ``reply_to``, it gives that list's session."""

    def __init__(self, pusher: ReplyPusher) -> None:
        self._pusher = pusher
        self._sessions: dict[str | None, ReplySession] = {}
        self._managers: list[Any] = []

    def __call__(self, reply_to: str | None) -> ReplySession:
        session = self._sessions.get(reply_to)
        if session is None:
            manager = self._pusher.session(reply_to)
            session = self._sessions[reply_to] = manager.__enter__()
            self._managers.append(manager)
        return session

    def held_since(self) -> float:
        """When the oldest reply held now was pushed (``time.monotonic``), inf if none is."""
        return min((s.held_since for s in self._sessions.values()), default=math.inf)

    def send(self, but: ReplySession | None = None) -> None:
        """Send every session's held replies (but ``but``'s)."""
        for session in self._sessions.values():
            if session is not but:
                session.send()

    def __enter__(self) -> ReplySessions:
        return self

    def __exit__(self, *_: object) -> None:
        error: BaseException | None = None
        for manager in self._managers:
            try:
                manager.__exit__(None, None, None)
            except BaseException as exc:  # one caller's lost acknowledgement, not the others'
                error = error or exc
        if error is not None:
            raise error


class ReplyListBackend(BaseBackend):  # type: ignore[misc]
    """Celery's result backend: pushes a failed task's error to ``request.reply_to``; nothing
    else is stored (the execute task replies by itself and ignores its result)."""

    supports_native_join = False
    persistent = False

    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._pusher = ReplyPusher(app.settings)

    def _store_result(
        self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None, **_: Any
    ) -> Any:
        reply_to = getattr(request, "reply_to", None)
        if state == states.SUCCESS and isinstance(result, dict):
            self._pusher.push(reply_to, result)
        elif state == states.FAILURE:
            self._pusher.push(reply_to, failure_reply(task_id, result, request))
        return result

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        return {"status": states.PENDING, "result": None, "task_id": task_id}

    def _forget(self, task_id: str) -> None:
        pass


def failure_reply(job_id: str, exc: Any, request: Any, shard: int = -1) -> dict[str, Any]:
    """The reply for a job the worker itself failed on (not the script: e.g. Redis lost)."""
    now = time.time()
    return Reply(
        job_id=job_id,
        execution=None,
        error=ErrorInfo(getattr(exc, "code", WorkerFailed.code), _described(exc)),
        shard=shard,
        worker=f"{getattr(request, 'hostname', None) or socket.gethostname()}:{os.getpid()}",
        received_at=now,
        finished_at=now,
    ).to_wire()


def _described(exc: Any) -> str:
    if isinstance(exc, dict) and "exc_type" in exc:  # Celery's encoding of a task's exception
        message = exc.get("exc_message")
        text = ", ".join(map(str, message)) if isinstance(message, (list, tuple)) else str(message)
        return f"{exc['exc_type']}: {text}"
    return f"{type(exc).__name__}: {exc}"
