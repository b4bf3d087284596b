"""Fair share of a worker between shops: start-time fair queuing on measured work.

A worker that has several jobs waiting (a message's batch, and what it pulls from its shard's
queue between jobs) runs them in the order of start-time fair queuing (Goyal, Vin and Cheng,
1996), not in the order they came:

* each shop has a tag, the virtual time at which its next job starts; the job with the smallest
  tag runs next, and the system's virtual time becomes that tag;
* running a job moves its shop's tag on by the job's work: an estimate when it starts (the
  shop's recent mean), corrected by :meth:`FairQueue.charge` with what it really cost;
* a shop that had nothing waiting starts at the system's virtual time: idle time is not banked
  as credit, and a shop that comes back is served next, ahead of one that has been flooding.

Work is the worker's own time on the job (lookup, instantiation, the guest, decoding): what the
shard has too little of when it is saturated. Instructions would miss a guest's host calls and
its instantiation, which cost the worker as much.

It is work-conserving (a shop alone gets every job run as soon as the worker can) and, when
shops compete, a job that cannot finish by its deadline in this order, and whose shop is ahead
of the virtual time (it has had more than the shop being served), is refused at once, with
``quota_exceeded``, instead of waiting out its caller's deadline. A late job at the front of the
order is not refused for fairness: no other shop holds it back.

Pure logic on an injected clock (``time.monotonic`` by default): no Redis, no Celery (the worker's loop is
``scriptpool.workers._serve``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
# A job handed out (to run, or refused): the item added, and its shop.
Handed = tuple[T, str]

# A shop's work per job is its recent mean: each measurement moves it this far (half: a few
# runs make a new shop's estimate, and one slow run, a compile say, is forgotten as fast).
SMOOTHING = 0.5
# What a job costs before anything was measured; a shop new to the worker starts from the mean
# over all shops' runs, if that is less, and its own runs move it from there.
FIRST_GUESS_S = 0.001
# Cost estimates are clamped here: a job's time cannot be below zero, and one job that blocked
# on a paused Redis for seconds must not make its shop look that slow for long.
MIN_COST_S, MAX_COST_S = 1e-6, 1.0
# A run is charged at most this many times its shop's mean (and at least this much may be).
SURGE_FACTOR, SURGE_FLOOR_S = 4.0, 0.010
# The worker counts as having been idle (every shop's past forgotten) after this long without a
# job taken or charged.
IDLE_RESET_S = 0.1
# Shops remembered while idle (their mean cost); past this, the longest idle are forgotten.
MAX_IDLE_SHOPS = 10_000


@dataclass(slots=True)
class _Shop(Generic[T]):
    waiting: deque[tuple[T, float]] = field(default_factory=deque)  # (item, deadline)
    tag: float = 0.0  # virtual start time of the head job
    cost_s: float = FIRST_GUESS_S
    started: float = 0.0  # estimate charged for the job of this shop now running, if any
    measured: bool = False  # a run of it was charged: cost_s is its own, not a guess


class FairQueue(Generic[T]):
    """Jobs of several shops, handed out by start-time fair queuing on measured work.

    ``add`` a job (any item: the worker's delivery context), ``take`` the next one with the
    jobs refused for being over their shop's share, then ``charge`` its shop with what it cost.
    Not thread-safe: one worker loop owns it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._busy_at = -math.inf  # when a job was last taken or charged
        self._shops: dict[str, _Shop[T]] = {}
        self._virtual = 0.0
        self._waiting = 0
        self._mean_cost_s = FIRST_GUESS_S
        self._latest_tag = 0.0  # the largest tag any shop has had

    def __len__(self) -> int:
        return self._waiting

    def backlog_s(self, now: float) -> float:
        """The estimated work of the jobs waiting that can still be done by their deadlines, in
        the order they would run (each shop's mean cost per job). What cannot be (it will be
        refused, or dropped as stale) holds nobody's time and is not counted: a worker pulling
        its queue looks past a flood that has outrun its deadlines to the shop behind it."""
        done = 0.0
        for _, _, shop_id, position in self._order():
            shop = self._shops[shop_id]
            if now + done + shop.cost_s <= shop.waiting[position][1]:
                done += shop.cost_s
        return done

    def _order(self) -> list[tuple[float, int, str, int]]:
        """Every waiting job as (tag, shop index, shop id, position), in the order they would run."""
        order: list[tuple[float, int, str, int]] = []
        for index, (shop_id, shop) in enumerate(self._shops.items()):
            tag = shop.tag
            for position in range(len(shop.waiting)):
                order.append((tag, index, shop_id, position))
                tag += shop.cost_s
        order.sort()
        return order

    def clear(self) -> list[Handed[T]]:
        """Every job still waiting, taken out (for a worker that stops serving them)."""
        left = [(item, shop_id) for shop_id, shop in self._shops.items() for item, _ in shop.waiting]
        for shop in self._shops.values():
            shop.waiting.clear()
        self._waiting = 0
        return left

    def add(self, item: T, shop_id: str, deadline: float) -> None:
        """Queue ``item`` (a job of ``shop_id`` whose caller gives up at ``deadline``)."""
        shop = self._shops.get(shop_id)
        if shop is None:
            if len(self._shops) >= MAX_IDLE_SHOPS:
                self._forget_idle()
            # Never above the first guess: under a flood the mean is the flooder's, and a quiet
            # shop new here must not be refused for what the flooder's runs cost.
            shop = self._shops[shop_id] = _Shop(cost_s=min(self._mean_cost_s, FIRST_GUESS_S))
        if not self._waiting and self._clock() - self._busy_at > IDLE_RESET_S:
            # The worker was idle: every shop's past is even. A shop whose last job cost more
            # than the others' (a compile, say) carries no debt into the next busy period. Not
            # at every moment nothing waits: a flood of one call at a time leaves the queue
            # empty between its jobs, and its history must count against it.
            self._virtual = max(self._virtual, self._latest_tag)
        if not shop.waiting:
            # Back from idle: it starts now, in virtual time, whatever it used before.
            shop.tag = max(shop.tag, self._virtual)
        shop.waiting.append((item, deadline))
        self._waiting += 1

    def take(
        self, now: float, *, check_late: bool = True
    ) -> tuple[tuple[T, str] | None, list[tuple[T, str]]]:
        """The next job to run, as (item, shop id), or None when nothing waits; and the jobs
        refused because their shop is over its share and they cannot finish by their deadline
        in this order (each leaves the queue, to be answered with ``quota_exceeded``).

        ``check_late``: look for such jobs (a walk over every waiting job). The order changes
        only when jobs arrive, so the worker asks after it took new ones in."""
        refused = self._refuse_late(now) if check_late and self._waiting > 1 else []
        best_id: str | None = None
        best: _Shop[T] | None = None
        for shop_id, shop in self._shops.items():
            if shop.waiting and (best is None or shop.tag < best.tag):
                best_id, best = shop_id, shop
        if best is None or best_id is None:
            return None, refused
        item, _ = best.waiting.popleft()
        self._waiting -= 1
        self._busy_at = self._clock()
        self._virtual = best.tag
        best.started = best.cost_s
        best.tag += best.cost_s
        self._latest_tag = max(self._latest_tag, best.tag)
        return (item, best_id), refused

    def estimate_s(self, shop_id: str) -> float:
        """What a job of ``shop_id`` is expected to cost: its recent mean, or, for a shop none of
        whose runs was measured yet, at least the first guess (its start is only a guess)."""
        shop = self._shops.get(shop_id)
        if shop is None or not shop.measured:
            return max(FIRST_GUESS_S, shop.cost_s if shop is not None else 0.0)
        return shop.cost_s

    def charge(self, shop_id: str, seconds: float) -> None:
        """The job of ``shop_id`` last taken cost ``seconds`` of the worker's time: its shop's tag
        is corrected from the estimate to that, and its mean cost moves towards it."""
        shop = self._shops.get(shop_id)
        if shop is None:
            return
        self._busy_at = self._clock()
        # One run far over the shop's mean is charged at most a few means: a worker paused, a
        # Redis stalled or a collector run must not put the shop it happened to behind for long
        # (seen: a run charged 0.5 s for a pause put a quiet shop behind thirty of a flood's).
        # A shop whose runs really grew gets there in a few runs.
        ceiling = min(MAX_COST_S, max(SURGE_FACTOR * shop.cost_s, SURGE_FLOOR_S))
        cost = min(max(seconds, MIN_COST_S), ceiling)
        shop.tag += cost - shop.started
        shop.started = 0.0
        self._latest_tag = max(self._latest_tag, shop.tag)
        # Smoothed from the first run on: one run that compiled the module must not become the
        # shop's whole estimate (its jobs behind it would be refused as if each compiled).
        shop.cost_s += SMOOTHING * (cost - shop.cost_s)
        shop.measured = True
        self._mean_cost_s += SMOOTHING * (cost - self._mean_cost_s)

    def refund(self, shop_id: str) -> None:
        """The job of ``shop_id`` last taken did not run (it was stale, or refused by a quota):
        its shop gets back the estimate it was charged, and its mean cost is left as it was
        (a flood of dropped jobs must not make its shop look cheap)."""
        shop = self._shops.get(shop_id)
        if shop is not None:
            shop.tag -= shop.started
            shop.started = 0.0

    def _refuse_late(self, now: float) -> list[Handed[T]]:
        """Walk the waiting jobs in the order they would run (by tag), adding up estimated work:
        a job that would finish after its deadline, of a shop whose tag is ahead of the front,
        behind some other shop's job, is refused (and adds nothing to the time the walk adds
        up). A shop alone is never refused: nobody else holds its jobs back."""
        order = self._order()
        if not order:
            return []
        front = order[0][0]
        finish = now
        ahead: set[str] = set()  # shops with a job before this one in the order
        late: dict[str, set[int]] = {}
        for tag, _, shop_id, position in order:
            shop = self._shops[shop_id]
            if shop.waiting[position][1] < now:
                continue  # already late: the worker drops it unrun, so it holds nobody back
            done = finish + shop.cost_s
            if done > shop.waiting[position][1] and tag > front and (len(ahead) > 1 or shop_id not in ahead):
                late.setdefault(shop_id, set()).add(position)
                continue
            ahead.add(shop_id)
            finish = done
        refused: list[Handed[T]] = []
        for shop_id, positions in late.items():
            shop = self._shops[shop_id]
            kept: deque[tuple[T, float]] = deque()
            for position, entry in enumerate(shop.waiting):
                if position in positions:
                    refused.append((entry[0], shop_id))
                else:
                    kept.append(entry)
            shop.waiting = kept
        self._waiting -= len(refused)
        return refused

    def _forget_idle(self) -> None:
        idle = [shop_id for shop_id, shop in self._shops.items() if not shop.waiting]
        for shop_id in idle[: max(1, len(idle) // 2)]:
            del self._shops[shop_id]
