"""The client's one timer thread: what frees a lane's slot at its message's deadline at the latest."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

from scriptpool.config import get_logger

log = get_logger("client")


class LaneClock:
    """One thread that runs each scheduled function at its (wall-clock) time: what frees a
    message's slot at its deadline when nothing else does. A lane arms it only for its
    earliest open message, so it wakes about once per deadline, not once per call."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[float], None]]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="scriptpool-lane-clock", daemon=True)
        self._thread.start()

    def schedule(self, when: float, work: Callable[[float], None]) -> None:
        """Call ``work(when)`` on the clock's thread once ``time.time()`` reaches ``when``."""
        with self._cond:
            if self._stopped:
                return
            heapq.heappush(self._heap, (when, next(self._order), work))
            if self._heap[0][2] is work:
                self._cond.notify()

    def stop(self) -> None:
        """Drop what is scheduled and end the thread (waiting for it, unless called on it)."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=3)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    if self._heap:
                        wait = self._heap[0][0] - time.time()
                        if wait <= 0:
                            when, _, work = heapq.heappop(self._heap)
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
            try:
                work(when)
            except Exception:  # the clock must outlive any bug in what it runs
                log.exception("lane_clock_failed")
