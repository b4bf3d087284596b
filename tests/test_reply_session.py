"""A worker's reply session against a real Redis: replies held and sent together, a pull whose
answer is read after the next job, and what happens to both when a write fails in between."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import redis

from scriptpool import Settings
from scriptpool.workers._backend import ReplyPusher, ReplySession
from tests.conftest import TEST_ARTIFACT_KEY


@pytest.fixture
def session(redis_url: str, redis_client: redis.Redis) -> Iterator[tuple[ReplySession, str, str]]:
    """A session on a reply list, with the name of a queue holding three messages."""
    settings = Settings(redis_url=redis_url, artifact_key=TEST_ARTIFACT_KEY)
    reply_to = settings.keys.replies("f" * 32)
    queue = settings.keys.queue(0)
    redis_client.lpush(queue, b"m1", b"m2", b"m3")
    with ReplyPusher(settings).session(reply_to) as opened:
        yield opened, reply_to, queue


def _replies(client: redis.Redis, reply_to: str) -> list[dict[str, Any]]:
    return [msgpack.unpackb(raw) for raw in client.lrange(reply_to, 0, -1)]


def test_held_replies_go_in_one_write_with_the_pull_behind_them(
    session: tuple[ReplySession, str, str], redis_client: redis.Redis
) -> None:
    """Pushed replies stay held (nothing in Redis) until a write; a pull begun sends them first,
    and its answer, read after, holds the queue's oldest messages."""
    replies, reply_to, queue = session
    replies.push({"job_id": "a"})
    replies.push({"job_id": "b"})
    assert redis_client.llen(reply_to) == 0
    replies.pop_begin(queue, 2)
    assert replies.pop_end() == [b"m1", b"m2"]
    assert [r["job_id"] for r in _replies(redis_client, reply_to)] == ["a", "b"]
    assert redis_client.ttl(reply_to) > 0


def test_a_write_that_fails_while_a_pull_is_under_way_loses_neither(
    session: tuple[ReplySession, str, str], redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply sent while a pull's answer is unread, on a connection that then fails to write:
    the pull's answer was read first (its messages are not lost with the connection), the reply
    stays held, and both arrive once Redis takes writes again."""
    replies, reply_to, queue = session
    replies.pop_begin(queue, 8)
    connection: Any = replies._connection  # the session's, for the failure

    def refuse(*_: Any, **__: Any) -> None:
        raise redis.ConnectionError("the write failed")

    monkeypatch.setattr(connection, "send_packed_command", refuse)
    replies.eager = True
    replies.push({"job_id": "c"})  # its write fails: logged, and the reply kept
    assert redis_client.llen(reply_to) == 0
    assert replies.pop_end() == [b"m1", b"m2", b"m3"]
    monkeypatch.undo()
    replies.send()
    assert [r["job_id"] for r in _replies(redis_client, reply_to)] == ["c"]


def test_a_pull_whose_connection_was_lost_says_so(
    session: tuple[ReplySession, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull whose answer cannot be read (the connection fails under it) raises a Redis error
    from ``pop_end``, the error the serving loop logs as ``pull_failed``, not an assertion."""
    replies, _, queue = session
    replies.pop_begin(queue, 8)
    connection: Any = replies._connection

    def lost(*_: Any, **__: Any) -> Any:
        raise redis.ConnectionError("connection reset")

    monkeypatch.setattr(connection, "can_read", lost)
    with pytest.raises(redis.RedisError):
        replies.pop_end()
    with pytest.raises(redis.RedisError):
        replies.pop_end()  # once lost, it stays a Redis error
