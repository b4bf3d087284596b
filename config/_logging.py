"""Logging: structured events on the standard ``logging`` machinery.

A library never writes to stdout. Every logger here is a stdlib logger under ``scriptpool.``
with structlog's calling convention (``log.info("event", key=value)``): each event becomes an
ordinary ``LogRecord`` whose message is the event name and whose attributes are its fields. A
host sees our events wherever it sends its own, and nothing unless it configures logging
(``scriptpool`` carries a ``NullHandler``). The CLI and the workers call :func:`configure_logging`,
which renders every record, Celery's too, with structlog: one JSON object per line, or readably
on a terminal.

The host side does not import structlog: with ``rich`` installed, ``import structlog`` measured
about 100 ms here, against 10 ms for all of this module's work.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

ROOT = "scriptpool"
logging.getLogger(ROOT).addHandler(logging.NullHandler())

# Field names a LogRecord keeps for itself; an event field of that name gets a trailing "_".
_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class EventLogger:
    """Logs events with fields (``log.warning("reconnecting", error=...)``) through a stdlib
    logger. An event below the logger's level costs one ``isEnabledFor`` check."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error event with the traceback of the exception being handled."""
        self._log(logging.ERROR, event, fields, exc_info=True)

    def _log(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        if not self._logger.isEnabledFor(level):
            return
        if not _RESERVED.isdisjoint(fields):
            fields = {(f"{k}_" if k in _RESERVED else k): v for k, v in fields.items()}
        self._logger.log(level, event, extra=fields, exc_info=exc_info, stacklevel=3)


def get_logger(name: str) -> EventLogger:
    """The event logger of ``scriptpool.<name>``."""
    return EventLogger(logging.getLogger(f"{ROOT}.{name}"))


def formatter(*, json: bool) -> logging.Formatter:
    """Renders any record as one JSON object (or a readable line): our events with their fields,
    other libraries' records with their message."""
    import structlog

    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )


def configure_logging(
    *,
    json: bool | None = None,
    level: int = logging.INFO,
    stream: TextIO | None = None,
    filename: str | None = None,
) -> logging.Handler:
    """Send every record at ``level`` and above to one handler on the root logger.

    ``stream`` defaults to stderr; ``filename`` appends to a file instead. ``json=None`` picks
    JSON unless the output is a terminal. Replaces a handler an earlier call installed.
    """
    target = stream or sys.stderr
    handler: logging.Handler = (
        logging.FileHandler(filename, encoding="utf-8") if filename else logging.StreamHandler(target)
    )
    if json is None:
        json = filename is not None or not target.isatty()
    handler.setFormatter(formatter(json=json))
    handler.set_name(ROOT)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == ROOT]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
