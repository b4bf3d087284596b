"""A worker's loop over its shard's jobs: fair between shops, and pulling the queue while busy.

Celery hands the execute task one message. When that message holds one job and nothing else
waits, the job runs at once, as before. Otherwise its jobs go into a :class:`FairQueue`, and
between jobs the worker pulls the messages that have queued up on the same shard meanwhile
(``RPOP`` with a count, sent behind the replies and read after the next job) into it as well,
so that a shop that floods the shard is seen next to the quiet shop whose one message arrived
behind its flood. The queue runs them by start-time fair queuing on measured work and refuses,
with ``quota_exceeded``, what a shop over its share cannot have done by its deadline
(``scriptpool.workers._fair``).

Messages pulled here are the same kombu envelopes Celery would have delivered, checked as
strictly (``scriptpool.workers._envelope``): a malformed one is logged and dropped.

Replies are held and sent together (:class:`~scriptpool.workers._backend.ReplySession`): at
once when nothing else waits, else before a job that may run long or once the oldest is
:data:`REPLY_HOLD_S` old. When nothing waits, a solo worker waits up to :data:`LINGER_S` for
the next message on any of its queues itself (``BLMPOP``, behind the replies) and goes on
serving; then the loop ends. It stops pulling when the worker is asked to stop (a warm shutdown
runs what it holds and no more), or after :data:`SERVE_BUDGET_S`, so that Celery's consumer
(remote control commands) gets the process back now and then under a flood; what was pulled by
then is still run, and the rest stays in Redis for the next delivery.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from scriptpool.config import get_logger
from scriptpool.config.errors import QuotaExceeded
from scriptpool.config.wire import Job, Taken
from scriptpool.workers._backend import ReplyPusher, ReplySession, ReplySessions, failure_reply
from scriptpool.workers._envelope import Delivery, decode_envelope
from scriptpool.workers._fair import FairQueue

log = get_logger("worker")

# What a worker holds in its fair queue at most: it pulls while fewer jobs wait. Enough to see
# a quiet shop's message behind the flood ahead of it (a client's lane keeps at most its window
# of messages per shard in the queue; over-share jobs that cannot make their deadline are
# refused as they come, and hold nothing).
LOOKAHEAD_JOBS = 256
# And at most this much estimated work: what a quiet shop's message waits for at worst, once per
# SERVE_BUDGET_S, when the worker stops pulling to give Celery's consumer its turn. Above what
# eight callers of scripts near a 60M-instruction limit keep queued (measured: with 0.1 s, the
# pulls paused while they did, and a quiet shop's call waited for three of their runs).
LOOKAHEAD_S = 0.250
# A worker that shares its shard with others (several workers, or a pool of several processes)
# holds at most this many jobs, and this much estimated work, besides what it runs: what it
# holds, an idle peer cannot run (measured: with 256 jobs, a busy worker took a burst of forty
# 3 ms jobs whole while the other worker of the shard sat idle). Both bounds, because a new
# shop's cost is a guess until it has run here.
LOOKAHEAD_SHARED_JOBS = 8
LOOKAHEAD_SHARED_S = 0.010
# Messages taken by one pull (one RPOP).
PULL_MESSAGES = 8
# While jobs wait, the queue is pulled at most this often: a quiet shop's message is seen within
# this (and the job running), and a flooding client's calls have the time to coalesce into
# batches instead of arriving as a message each (measured: pulling after every job cut a
# flooded shard's throughput by a third).
PULL_INTERVAL_S = 0.002
# A reply is held (to go out with the next ones in one write) at most this long after its job
# ended, and never behind a job expected to run this long: with every reply sent at once, the
# writes cost a flooded worker more than the jobs (measured: 38 % of its time in py-spy).
REPLY_HOLD_S = 0.0005
# Once nothing waits, a solo worker waits this long for its queues' next message itself (a
# BLMPOP, as Celery's consumer would BRPOP), and keeps serving when one comes; then it goes back
# to Celery. A caller calling again and again is served without Celery's dispatch of each
# message (measured: a serial call's queue_wait 0.19 ms before, 0.04 ms after).
LINGER_S = 0.1
# How long one delivery keeps pulling before the process goes back to Celery's consumer
# (measured: with 0.5 s, the drain at each return cost a quiet shop one call in ten beside a
# flood of 10 ms scripts).
SERVE_BUDGET_S = 5.0


@dataclass(frozen=True, slots=True)
class _Queued:
    job: Job
    reply_to: str | None
    shard: int


# What the worker does with a job: run it and reply (returning the worker time it cost its shop,
# in seconds, None if it did not run), or refuse it (reply ``quota_exceeded``, count it).
RunJob = Callable[[Job, ReplySession, int], float | None]


class RefuseJob(Protocol):
    """Answer a job ``quota_exceeded`` without running it (``reason``: why, for counting)."""

    def __call__(
        self, job: Job, error: QuotaExceeded, replies: ReplySession, shard: int, *, reason: str
    ) -> None: ...


# The refusal's reason (in its detail, the log and the metric) when fairness refused it.
FAIR_SHARE = "fair_share"


class Server:
    """Serves deliveries for one worker process, with its ``run_job`` and ``refuse``."""

    def __init__(
        self,
        replies: ReplyPusher,
        run_job: RunJob,
        refuse: RefuseJob,
        shares_shard: Callable[[int], bool],
        stopping: Callable[[], bool] = lambda: False,
        lingers_on: Callable[[], dict[str, int] | None] = lambda: None,
    ) -> None:
        """``lingers_on``: the queues (and their shards) the worker consumes, for it to wait on
        itself once nothing waits (:data:`LINGER_S`); None where Celery's consumer must have the
        queue back at once (a pool other than solo: its consumer holds the next message for a
        process that would be lingering)."""
        self._lingers_on = lingers_on
        self._shares_shard = shares_shard
        self._stopping = stopping
        self._replies = replies
        self._run_job = run_job
        self._refuse_job = refuse
        # Of the delivery being served: the Celery request (its hostname names the worker in
        # failure replies) and the worker's name in every reply.
        self.request: Any = None
        self.worker = ""
        self._fair: FairQueue[_Queued] = FairQueue()
        self._lock = threading.Lock()

    def serve(self, delivery: Delivery, queue: str, request: Any) -> None:
        """Run ``delivery``'s jobs, and what the shard's queue ``queue`` holds meanwhile, fairly."""
        # A threads pool runs deliveries side by side: each but the first has a queue of its own.
        self.request = request
        self.worker = f"{getattr(request, 'hostname', None) or socket.gethostname()}:{os.getpid()}"
        shared = self._lock.acquire(blocking=False)
        try:
            self._serve(self._fair if shared else FairQueue(), delivery, queue, request)
        finally:
            if shared:
                self._lock.release()

    def _serve(self, fair: FairQueue[_Queued], delivery: Delivery, queue: str, request: Any) -> None:
        with ReplySessions(self._replies) as session_for:
            try:
                self._loop(fair, delivery, queue, request, session_for)
            finally:
                # Only if the loop itself broke (a bug, or the process being stopped): whatever
                # it still held is answered as the worker's failure, not left to time out.
                self._abandon(fair, request, session_for)

    def _loop(
        self,
        fair: FairQueue[_Queued],
        delivery: Delivery,
        queue: str,
        request: Any,
        session_for: ReplySessions,
    ) -> None:
        # Refusing for fairness needs a choice to make: a lone job is run as it came.
        fresh = self._admit(fair, delivery, request, session_for) > 1
        # Pulls go on the connection of the last replies, behind them (ReplySession.pop_begin).
        via = session_for(delivery.reply_to)
        now = time.monotonic()
        pulling_until = now + SERVE_BUDGET_S
        pulled_at = now  # the delivery itself was just taken from the queue
        pulling: ReplySession | None = None  # whose RPOP is under way while a job runs
        shard = delivery.shard
        try:
            while True:
                if pulling is not None:
                    # Its answer came while the last job ran (or, with nothing to run, is waited for).
                    fresh = self._end_pull(fair, queue, shard, request, session_for, pulling) > 0 or fresh
                    pulling = None
                now = time.monotonic()
                if (
                    now < pulling_until
                    and (not len(fair) or now - pulled_at >= PULL_INTERVAL_S)
                    and not self._stopping()
                ):
                    pulled_at = now
                    session_for.send(but=via)  # what the pull's round trip does not carry
                    if not len(fair):
                        lingered = self._linger(fair, queue, shard, request, session_for, via)
                        if lingered is not None:
                            queue, shard, taken = lingered  # pulls follow the shard that had work
                            if taken == PULL_MESSAGES:
                                # The rest of a burst is seen now, not a pull later.
                                self._pull(fair, queue, shard, request, session_for, via)
                        fresh = True
                    elif self._has_room(fair, shard) and self._begin_pull(queue, via):
                        pulling = via
                if not len(fair):  # (a pull is begun only while jobs wait)
                    return
                via = self._run_next(fair, fresh, request, session_for) or via
                fresh = False
        finally:
            if pulling is not None:  # the loop broke (a bug, the process stopping) mid-pull
                # What it took is queued, to be answered as the worker's failure (_abandon).
                self._end_pull(fair, queue, shard, request, session_for, pulling, more=False)

    def _run_next(
        self, fair: FairQueue[_Queued], fresh: bool, request: Any, session_for: ReplySessions
    ) -> ReplySession | None:
        """Refuse what is late for fair share (``fresh``: jobs came in since the last look), then
        run the next job and charge its shop; the session its reply went to, None if none ran."""
        taken, refused = fair.take(time.time(), check_late=fresh)
        for late, _ in refused:
            self._refuse(late, session_for(late.reply_to))
        if taken is None:
            return None
        queued, shop_id = taken
        # Held replies go before a job that may keep them long (one of a shop not measured yet
        # counts as one: a first run may compile), or once they are old.
        held_for = time.monotonic() - session_for.held_since()
        if held_for >= REPLY_HOLD_S or fair.estimate_s(shop_id) >= REPLY_HOLD_S:
            session_for.send()
        via = session_for(queued.reply_to)
        via.eager = not len(fair)  # nothing else to run: its reply goes at once
        try:
            seconds = self._run_job(queued.job, via, queued.shard)
        except Exception as exc:  # this job's failure (run_job answers its own): not the others'
            log.error("job_crashed", job=queued.job.id, shop=shop_id, error=repr(exc)[:300])
            via.push(failure_reply(queued.job.id, exc, request, queued.shard))
            seconds = None
        if seconds is None:
            fair.refund(shop_id)
        else:
            fair.charge(shop_id, seconds)
        return via

    def _abandon(
        self, fair: FairQueue[_Queued], request: Any, session_for: Callable[[str | None], ReplySession]
    ) -> None:
        left = fair.clear()
        if not left:
            return
        log.error("jobs_abandoned", jobs=len(left))
        for queued, _ in left:
            try:
                session_for(queued.reply_to).push(
                    failure_reply(
                        queued.job.id, RuntimeError("the worker stopped serving"), request, queued.shard
                    )
                )
            except Exception as exc:
                log.warning("reply_failed", job=queued.job.id, error=repr(exc)[:200])

    # -- intake ------------------------------------------------------------------------------------
    def _admit(
        self,
        fair: FairQueue[_Queued],
        delivery: Delivery,
        request: Any,
        session_for: Callable[[str | None], ReplySession],
    ) -> int:
        """Queue ``delivery``'s jobs (after its take notice, if it asks for one); how many."""
        jobs = delivery.jobs
        if delivery.announce and jobs and isinstance(jobs[0], dict) and type(jobs[0].get("id")) is str:
            notified = session_for(delivery.reply_to)
            notified.push(Taken(jobs[0]["id"]).to_wire())
            notified.send()  # at once: the client publishes what piled up behind the message
        admitted = 0
        for wire in jobs:
            try:
                job = Job.from_wire(wire)
            except ValueError as exc:  # one bad job of a message: its own reply, and the rest run
                job_id = wire.get("id") if isinstance(wire, dict) else None
                log.warning(
                    "security_job_refused", shard=delivery.shard, job=str(job_id)[:64], problem=str(exc)[:200]
                )
                if type(job_id) is str:
                    session_for(delivery.reply_to).push(failure_reply(job_id, exc, request, delivery.shard))
                continue
            fair.add(_Queued(job, delivery.reply_to, delivery.shard), job.shop_id, job.deadline)
            admitted += 1
        return admitted

    def _admit_messages(
        self,
        fair: FairQueue[_Queued],
        messages: list[Any],
        queue: str,
        shard: int,
        request: Any,
        session_for: Callable[[str | None], ReplySession],
    ) -> int:
        """Queue the jobs of raw ``messages`` taken from ``queue`` (a malformed one is logged and
        dropped); how many."""
        admitted = 0
        for envelope in messages:
            delivery = decode_envelope(envelope, queue, shard)
            if delivery is not None:
                admitted += self._admit(fair, delivery, request, session_for)
        return admitted

    def _has_room(self, fair: FairQueue[_Queued], shard: int) -> bool:
        """Whether the worker may hold more of the shard's jobs: under :data:`LOOKAHEAD_JOBS` and
        :data:`LOOKAHEAD_S` of work, or the shared bounds if it shares the shard with others."""
        # Shared with other workers, the shard's queue is theirs too: hold little work.
        most_jobs, most_work = (
            (LOOKAHEAD_SHARED_JOBS, LOOKAHEAD_SHARED_S)
            if self._shares_shard(shard)
            else (LOOKAHEAD_JOBS, LOOKAHEAD_S)
        )
        return len(fair) < most_jobs and fair.backlog_s(time.time()) < most_work

    def _begin_pull(self, queue: str, via: ReplySession) -> bool:
        """Send ``RPOP queue`` on ``via``'s connection and go on; False if it could not be sent
        (a Redis error leaves the queue to Celery's consumer)."""
        if not queue:
            return False
        try:
            via.pop_begin(queue, PULL_MESSAGES)
        except (redis.RedisError, OSError) as exc:
            log.warning("pull_failed", queue=queue, error=repr(exc))
            return False
        return True

    def _end_pull(
        self,
        fair: FairQueue[_Queued],
        queue: str,
        shard: int,
        request: Any,
        session_for: Callable[[str | None], ReplySession],
        via: ReplySession,
        *,
        more: bool = True,
    ) -> int:
        """Queue the jobs of the messages the pull begun on ``via`` took; if it took all it asked
        for (a backlog) and ``more``, go on pulling at once (:meth:`_pull`). How many jobs they
        brought."""
        try:
            messages = via.pop_end()
        except (redis.RedisError, OSError) as exc:
            log.warning("pull_failed", queue=queue, error=repr(exc))
            return 0
        admitted = self._admit_messages(fair, messages, queue, shard, request, session_for)
        if more and len(messages) == PULL_MESSAGES:
            admitted += self._pull(fair, queue, shard, request, session_for, via)
        return admitted

    def _pull(
        self,
        fair: FairQueue[_Queued],
        queue: str,
        shard: int,
        request: Any,
        session_for: Callable[[str | None], ReplySession],
        via: ReplySession,
    ) -> int:
        """Take the messages waiting on ``queue`` into the fair queue, :data:`PULL_MESSAGES` per
        round trip (on ``via``'s connection), until it holds :data:`LOOKAHEAD_JOBS` or the queue
        is empty; how many jobs they brought. A Redis error leaves the queue to Celery's consumer."""
        if not queue:
            return 0
        admitted = 0
        while self._has_room(fair, shard):
            try:
                messages = via.pop(queue, PULL_MESSAGES)
            except (redis.RedisError, OSError) as exc:
                log.warning("pull_failed", queue=queue, error=repr(exc))
                return admitted
            admitted += self._admit_messages(fair, messages, queue, shard, request, session_for)
            if len(messages) < PULL_MESSAGES:
                return admitted
        return admitted

    def _linger(
        self,
        fair: FairQueue[_Queued],
        queue: str,
        shard: int,
        request: Any,
        session_for: Callable[[str | None], ReplySession],
        via: ReplySession,
    ) -> tuple[str, int, int] | None:
        """Wait up to :data:`LINGER_S` for the next messages (up to :data:`PULL_MESSAGES`, behind
        the replies held) on any queue the worker consumes, ``queue`` last (another shard's
        waiting callers first), and queue their jobs: (the queue, its shard, how many messages),
        or None if none came (or the worker does not linger). A Redis error leaves the queues to
        Celery's consumer."""
        queues = self._lingers_on()
        if not queue or queues is None:
            return None
        order = [other for other in queues if other != queue] + [queue]
        try:
            popped_from, messages = via.wait_pop(order, PULL_MESSAGES, LINGER_S)
        except (redis.RedisError, OSError) as exc:
            log.warning("pull_failed", queue=queue, error=repr(exc))
            return None
        if popped_from is None or not messages:
            return None
        shard = queues.get(popped_from, shard if popped_from == queue else -1)
        self._admit_messages(fair, messages, popped_from, shard, request, session_for)
        return popped_from, shard, len(messages)

    def _refuse(self, queued: _Queued, replies: ReplySession) -> None:
        job = queued.job
        error = QuotaExceeded(
            f"shop {job.shop_id} is over its fair share of shard {queued.shard}: "
            "this call could not have run before its deadline",
            shop=job.shop_id,
            shard=queued.shard,
            reason=FAIR_SHARE,
        )
        self._refuse_job(job, error, replies, queued.shard, reason=FAIR_SHARE)
