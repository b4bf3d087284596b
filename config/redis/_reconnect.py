"""The one reconnect loop: the reply reader, the invalidation listener and the heartbeat run their
sessions with Redis inside it, and it retries each lost session with capped exponential backoff."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import redis

from scriptpool.config._logging import get_logger

TRANSPORT_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, OSError)


class Reconnector:
    """Runs ``session`` on a daemon thread until :meth:`stop`; restarts it after it fails.

    ``session(reconnector)`` opens its own connections, works until the stop event is set (it
    returns) or Redis fails (it raises), and calls :meth:`healthy` once its connection works, which
    resets the backoff. A transport error is logged as ``<name>_reconnecting``; any other
    exception is a bug, logged with its traceback as ``<name>_failed``, and retried the same way,
    because a thread that dies strands everyone who depends on it.
    """

    def __init__(
        self,
        name: str,
        session: Callable[[Reconnector], None],
        *,
        initial_backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        logger: Any = None,
    ) -> None:
        self.name = name
        self.stopping = threading.Event()
        self._session = session
        self._initial = initial_backoff_s
        self._max = max_backoff_s
        self._backoff = initial_backoff_s
        self._log = logger or get_logger("reconnect")
        self._thread = threading.Thread(target=self._run, name=f"scriptpool-{name}", daemon=True)

    def start(self) -> Reconnector:
        self._thread.start()
        return self

    def healthy(self) -> None:
        """The session's connection works: the next failure starts from the initial backoff."""
        self._backoff = self._initial

    def stop(self, timeout: float | None = 5.0) -> None:
        """Ask the session to end and wait up to ``timeout`` seconds for the thread."""
        self.stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._session(self)
            except TRANSPORT_ERRORS as exc:
                if not self.stopping.is_set():
                    self._log.warning(f"{self.name}_reconnecting", error=str(exc), backoff_s=self._backoff)
            except Exception:
                self._log.exception(f"{self.name}_failed", backoff_s=self._backoff)
            if self.stopping.wait(self._backoff):
                return
            self._backoff = min(self._backoff * 2, self._max)
