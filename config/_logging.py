"""Logging: structured events on the standard ``logging`` machinery.

A library never writes to stdout. Every logger here is a stdlib logger under ``scriptpool.``
with structlog's calling convention (``log.info("event", key=value)``): each event becomes an
ordinary ``LogRecord`` whose attributes are its fields and whose message is the event with them
(``reply_dispatcher_reconnecting error="..." backoff_s=0.5``), so plain ``logging`` shows them
too: the record's ``msg`` is the template ``event error=%s backoff_s=%s`` and its ``args`` the
values, formatted only if something reads the message (and a log aggregator that groups by
template groups by event). :func:`event_name` gives the bare event. A host sees our events
wherever it sends its own, and nothing unless it configures logging (``scriptpool`` carries a
``NullHandler``). The CLI and the workers call :func:`configure_logging`, which renders every
record, Celery's and Python's warnings too, with structlog: one JSON object per line (the event
as ``event``, each field its own key), or readably on a terminal.

The host side does not import structlog: with ``rich`` installed, ``import structlog`` measured
about 100 ms here, against 10 ms for all of this module's work.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any, TextIO

ROOT = "scriptpool"
# The level names structlog's add_log_level gives a record of each standard level.
_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}
logging.getLogger(ROOT).addHandler(logging.NullHandler())

# Field names a LogRecord keeps for itself; an event field of that name gets a trailing "_".
_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _Template(str):
    """The ``msg`` of an event's record: ``event key=%s ...``; ``event`` is the bare name."""

    event: str


@lru_cache(maxsize=4096)
def _template(event: str, keys: tuple[str, ...]) -> _Template:
    # A field whose name is not an identifier (only a **{...} call can give one) stays out of
    # the message: it could not be named in the template.
    named = [f"{key}=%({key})s" for key in keys if key.isidentifier()]
    template = _Template(" ".join([event.replace("%", "%%"), *named]) if named else event)
    template.event = event
    return template


def _shown(value: Any) -> str:
    """One field's value in a message: a word as it is, any other text quoted as JSON, anything
    else as JSON (or its repr)."""
    if isinstance(value, str):
        if value and not any(c.isspace() or c in '"=\\' for c in value):
            return value
        return json.dumps(value, ensure_ascii=False)
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError):  # a circular structure, or keys JSON cannot have
        return repr(value)


class _Fields(Mapping[str, str]):
    """An event's fields as its record's ``args``: each formatted only when the message is
    read, so a record nobody renders as text costs one object, not one per field."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields

    def __getitem__(self, key: str) -> str:
        return _shown(self._fields[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


def event_name(record: logging.LogRecord) -> str:
    """The event a record of ours carries (its message without the fields); any other record's
    message."""
    msg = record.msg
    return msg.event if isinstance(msg, _Template) else record.getMessage()


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
        template = _template(event, tuple(fields))
        args = (_Fields(fields),) if fields else ()
        self._logger.log(level, template, *args, extra=fields, exc_info=exc_info, stacklevel=3)


def get_logger(name: str) -> EventLogger:
    """The event logger of ``scriptpool.<name>``."""
    return EventLogger(logging.getLogger(f"{ROOT}.{name}"))


def formatter(*, json: bool) -> logging.Formatter:
    """Renders any record as one JSON object (or a readable line): our events with their fields,
    other libraries' records with their message."""
    import structlog

    stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )

    class EventFormatter(structlog.stdlib.ProcessorFormatter):
        """Renders our events by their bare name, their fields beside it (not in the message)."""

        def format(self, record: logging.LogRecord) -> str:
            msg, args = record.msg, record.args
            if not isinstance(msg, _Template):
                return super().format(record)
            if json and not record.exc_info and not record.stack_info:
                # The same object the chain below makes (a test compares them), with the same
                # stamper and renderer, without copying the record through four processors:
                # 7 us instead of 29, on a worker's line per execution.
                event: dict[str, Any] = {
                    "event": msg.event,
                    "level": _LEVELS.get(record.levelno) or record.levelname.lower(),
                    "logger": record.name,
                }
                # What ExtraAdder adds: the event's fields, and whatever a record factory or a
                # filter put on the record (a trace id, say), in the record's order.
                for key, value in record.__dict__.items():
                    if key not in _RESERVED:
                        event[key] = value
                return str(renderer(None, "", stamper(None, "", event)))
            # Swapped for this format only (it copies the record; a record is handled in one
            # thread), so other handlers of the record still get the message with the fields.
            message = record.__dict__.pop("message", None)  # another formatter's, with the fields
            record.msg, record.args = msg.event, ()
            try:
                return super().format(record)
            finally:
                record.msg, record.args = msg, args
                if message is not None:
                    record.message = message

    return EventFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            stamper,
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
    """Send every record at ``level`` and above to one handler on the root logger, and Python's
    warnings too (each one event, ``python_warning``, instead of lines of text on stderr).

    ``stream`` defaults to stderr; ``filename`` appends to a file instead. ``json=None`` picks
    JSON unless the output is a terminal. Replaces a handler an earlier call installed.
    """
    warnings.showwarning = _log_warning
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


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` once logging is configured: one ``python_warning`` event, its
    text on one line, where it came from as a field."""
    if file is not None:  # written to a file of the caller's choosing, as Python would
        file.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    _WARNINGS.warning(
        "python_warning",
        category=category.__name__,
        text=" ".join(str(message).split()),
        source=f"{filename}:{lineno}",
    )


_WARNINGS = EventLogger(logging.getLogger("py.warnings"))
