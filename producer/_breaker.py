"""Circuit breakers per (shop, EP), in the spirit of Semian.

Closed: calls pass; ``error_threshold`` failures within ``error_window_s`` open it.
Open: calls get the fallback at once, nothing is enqueued; after ``cooldown_s`` it half-opens.
Half-open: exactly one probe passes; success closes it, failure re-opens it for another cool-down.
A probe that never reports (its caller was cancelled) holds the breaker only until its deadline:
then the next call probes instead, so no lost call can keep a (shop, EP) refused for good.

What counts as a failure: only what says the pool is not answering, or not in time: no reply by
the deadline (``timeout``), Redis unreachable (``broker_unavailable``), a worker that failed or
sent a reply it could not have sent (``worker_error``, ``invalid_reply``), and a script stopped by
its wall clock (``wall_clock_exceeded``, which depends on the worker's load). These are the error
classes with ``trips_breaker`` (``scriptpool.config.errors``). A script's other errors (a trap, invalid
output, a fuel, memory or stack limit) are answers, given promptly and decided by the input:
counting them would let five bad carts turn away the good ones after them, for a cost the
script's limits already bound. Such an answer counts as a success, as any reply does.

Why not pybreaker: it wraps a call, and our call is an enqueue plus a wait that may finish on
another thread or in an asyncio task; it also has no notion of letting exactly one probe through.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from scriptpool.config.errors import InvalidArgument

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

# The longest window and cool-down: an hour. A breaker keeps each failure of its window, so an
# endless window would keep every one; and a breaker open for longer than an hour is a switch,
# not a breaker.
MAX_BREAKER_S = 3600.0


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a breaker opens and how long it stays open.

    ``error_threshold`` failures (an integer, 1 or more; a huge one, such as ``10**9``, never
    opens it) within ``error_window_s`` seconds open it, for ``cooldown_s`` seconds. Both times
    are numbers in (0, 3600]. Any other value is refused here, by :class:`InvalidArgument`
    naming the field and its range.
    """

    error_threshold: int = 5
    error_window_s: float = 10.0
    cooldown_s: float = 2.0

    def __post_init__(self) -> None:
        if type(self.error_threshold) is not int or self.error_threshold < 1:
            raise InvalidArgument(
                f"BreakerPolicy.error_threshold must be an integer, 1 or more, got {self.error_threshold!r}",
                field="error_threshold",
            )
        for name in ("error_window_s", "cooldown_s"):
            value = getattr(self, name)
            # NaN fails the comparison, so it is refused too.
            if type(value) not in (int, float) or not 0 < value <= MAX_BREAKER_S:
                raise InvalidArgument(
                    f"BreakerPolicy.{name} must be a number of seconds in (0, {MAX_BREAKER_S:g}], "
                    f"got {value!r}",
                    field=name,
                )


class CircuitBreaker:
    """One breaker. Thread-safe: ``allow`` before a call, then ``success`` or ``failure``."""

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: deque[float] = deque()
        self._state = CLOSED
        self._opened_at = 0.0
        self._probe_until = -math.inf  # while a probe is out: when it has given up at the latest

    @property
    def state(self) -> str:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def allow(self, timeout_s: float = math.inf) -> bool:
        """True if a call may go ahead (in half-open, only for the one probe). ``timeout_s``: how
        long the call waits at most; a probe that has not reported by then never will."""
        with self._lock:
            self._maybe_half_open()
            if self._state == CLOSED:
                return True
            if self._state == HALF_OPEN:
                now = self._clock()
                if now >= self._probe_until:
                    self._probe_until = now + timeout_s
                    return True
            return False

    def success(self) -> None:
        with self._lock:
            if self._state == HALF_OPEN:
                self._state = CLOSED
                self._probe_until = -math.inf
                self._failures.clear()

    def failure(self) -> None:
        with self._lock:
            now = self._clock()
            if self._state == HALF_OPEN:
                self._open(now)
                return
            self._failures.append(now)
            while self._failures and self._failures[0] < now - self._policy.error_window_s:
                self._failures.popleft()
            if self._state == CLOSED and len(self._failures) >= self._policy.error_threshold:
                self._open(now)

    def _open(self, now: float) -> None:
        self._state = OPEN
        self._opened_at = now
        self._probe_until = -math.inf
        self._failures.clear()

    def _maybe_half_open(self) -> None:
        if self._state == OPEN and self._clock() - self._opened_at >= self._policy.cooldown_s:
            self._state = HALF_OPEN
            self._probe_until = -math.inf


class BreakerBoard:
    """The breakers of one client, created on first use per (shop, EP)."""

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._lock = threading.Lock()

    def get(self, shop_id: str, ep: str) -> CircuitBreaker:
        key = (shop_id, ep)
        breaker = self._breakers.get(key)
        if breaker is None:
            with self._lock:
                breaker = self._breakers.setdefault(key, CircuitBreaker(self._policy, self._clock))
        return breaker
