"""A client's connections to all its shard groups, from the warm-up to ``close``, and each shard's
outlet: where its lane's messages go."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import redis

from scriptpool.config import Settings, get_logger
from scriptpool.config.heartbeats import live_workers, shard_count_disagreement
from scriptpool.producer._calls import Call
from scriptpool.producer._group import TRANSPORT_ERRORS, GroupLink

log = get_logger("client")

# A publish waits for Redis's acknowledgement at most this long (the client's socket timeout),
# and at least this long, however little time its caller has left.
_PUBLISH_TIMEOUT_S = 1.0
_PUBLISH_MIN_S = 0.001
# close() waits this long at most for its reply lists to be deleted (a Redis that answers takes
# about a millisecond); then it drops its connections, which ends any read still waiting on them.
_CLOSE_S = 0.25


class Links:
    """This client's connections: one :class:`GroupLink` per shard group (``groups``), the
    link of each shard (``of_shard``), and whether the client is ``closed``."""

    def __init__(self, settings: Settings, client_id: str) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.closed = False
        self.groups = [GroupLink(group, self.keys, client_id, settings) for group in settings.groups]
        by_url = {link.group.url: link for link in self.groups}
        self.of_shard = [by_url[settings.group_of(shard).url] for shard in range(settings.shards)]
        self.shard_count_checked = 0.0  # time.monotonic() of the last check
        self._shard_count_warned = False

    def warm(self) -> None:
        """Connect to every group now (redis-py connects lazily; connecting on the first run
        would spend that caller's deadline), then check the workers' shard count."""
        for link in self.groups:
            if self.closed:
                return  # a new connection to a Redis that does not answer would only delay exit
            try:
                link.redis.ping()
            except TRANSPORT_ERRORS as exc:
                log.warning("publisher_warmup_failed", group=link.group.name, error=str(exc))
            else:
                link.answered = True
        self.check_shard_count()

    def check_shard_count(self) -> None:
        """Log once if live workers run with another SCRIPTPOOL_SHARDS than this client: their
        queues differ, so some shops' calls would only ever time out."""
        self.shard_count_checked = time.monotonic()
        beats = []
        for link in self.groups:
            if self.closed:
                return
            try:
                beats.extend(live_workers(link.redis, self.keys))
            except TRANSPORT_ERRORS:
                continue  # that group's calls fall back; the others are still worth checking
        disagreement = shard_count_disagreement(beats, self.settings.shards)
        if disagreement and not self._shard_count_warned:
            self._shard_count_warned = True
            log.error(
                "shard_count_mismatch",
                client_shards=self.settings.shards,
                worker_shards={str(count): names for count, names in disagreement.items()},
            )

    def close(self) -> None:
        """Stop the reply readers and EP reads, delete the reply lists and release every
        connection, within about 0.25 s whatever Redis does (``closed`` is set already)."""
        for link in self.groups:
            link.stop_reads()
            link.replies.stop()  # wakes its blocking read now
        until = time.monotonic() + _CLOSE_S
        # Deleting a reply list is one round trip on a Redis that answers; on one that does not,
        # it is given up at the bound, and the list expires by itself (Keys.REPLY_TTL_S).
        cleaners = [
            threading.Thread(target=link.delete_replies, name="scriptpool-close", daemon=True)
            for link in self.groups
        ]
        for cleaner in cleaners:
            cleaner.start()
        for cleaner in cleaners:
            cleaner.join(max(until - time.monotonic(), 0.0))
        for link in self.groups:
            link.release()
        for link in self.groups:
            link.replies.join(max(until - time.monotonic(), 0.0))


class ShardOutlet:
    """Where one shard's lane sends its messages (its ``Outlet``): the shard's queue on its
    group's Redis, published in the calling thread or, :meth:`later`, on the client's threads."""

    __slots__ = ("_link", "_links", "_queue", "_threads")

    def __init__(self, links: Links, shard: int, threads: ThreadPoolExecutor) -> None:
        self._links = links
        self._link = links.of_shard[shard]
        self._queue = links.keys.queue(shard)
        self._threads = threads

    def publish(self, calls: Sequence[Call], announce: bool) -> None:
        """One task message carrying ``calls`` (one or more jobs for this shard); with
        ``announce`` the worker says when it takes it (``scriptpool.producer._batching``)."""
        first = calls[0].job
        argsrepr = f"[job {first.ep}/{first.shop_id}]" if len(calls) == 1 else f"[{len(calls)} jobs]"
        link = self._link
        if self._links.closed:
            raise redis.ConnectionError("the client is closed")
        # Wait for Redis's acknowledgement no longer than the latest caller of the message waits.
        remaining = max(call.job.deadline for call in calls) - time.time()
        try:
            link.tasks.publish(
                first.id,
                [call.job.to_wire() for call in calls],
                {"announce": True} if announce else {},
                queue=self._queue,
                reply_to=link.replies.reply_key,
                argsrepr=argsrepr,
                timeout=min(_PUBLISH_TIMEOUT_S, max(remaining, _PUBLISH_MIN_S)),
                # A traced call's context, in the headers as Celery's instrumentation puts it
                # (each job carries its own; a batch's headers carry its first call's).
                headers=first.trace,
            )
        except TRANSPORT_ERRORS:
            link.failing = True
            raise
        except Exception:  # a bug, not Redis: logged; the lane fails the calls all the same
            log.exception("publish_failed", jobs=len(calls))
            raise
        link.failing, link.answered = False, True
        now = time.perf_counter()
        for call in calls:
            call.enqueued = now

    def later(self, work: Callable[[], None]) -> None:
        """Run ``work`` on one of the client's publishing threads; dropped once it is closed
        (nobody waits for what is left in the lanes)."""
        with contextlib.suppress(RuntimeError):
            self._threads.submit(work)
