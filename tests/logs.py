"""Capturing the project's log events in a test, as the dicts structlog would have rendered."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from scriptpool.config import event_name

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


@contextmanager
def captured_events(level: int = logging.DEBUG) -> Iterator[list[dict[str, Any]]]:
    """Every event logged under ``scriptpool`` while the block runs: ``event``, ``log_level``,
    ``logger`` and the event's own fields."""
    events: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
            fields["exc_info"] = bool(record.exc_info)
            events.append(
                {
                    "event": event_name(record),
                    "log_level": record.levelname.lower(),
                    "logger": record.name,
                    **fields,
                }
            )

    handler = Collect(level)
    logger = logging.getLogger("scriptpool")
    before = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield events
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)
