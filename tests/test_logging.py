"""Logging as a host and an operator meet it (issue 21, items 15 and 16): plain ``logging`` shows
each event with its fields; structured renderers keep the bare event and the fields as keys;
Python warnings are events; and a worker whose output is not a terminal writes only JSON lines
(no banner, no SecurityWarning text, no "worker: Warm shutdown"), while on a terminal it keeps
Celery's banner, which says the solo pool's true concurrency, 1."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import select
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scriptpool.config import Settings, configure_logging, event_name, get_logger
from scriptpool.testing import worker_argv
from tests.conftest import ROOT, TEST_ARTIFACT_KEY
from tests.logs import captured_events
from tests.pool import worker_env


@pytest.fixture
def plain_logging() -> Iterator[io.StringIO]:
    """What ``logging.basicConfig()`` gives a host: ``LEVEL:logger:message`` lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


def test_plain_logging_shows_each_event_with_its_fields(plain_logging: io.StringIO) -> None:
    """``basicConfig()`` shows ``event key=value ...``: words bare, other text quoted, other
    values as JSON; the fields stay attributes of the record, and the event its bare name."""
    log = get_logger("client")
    with captured_events() as events:
        log.warning(
            "reply_dispatcher_reconnecting", error="Connection refused", backoff_s=0.5, shards=[0, 1], ok=True
        )
        log.warning("no_fields")
        log.warning("odd_values", percent="100%", quote='say "x"', empty="", nested={"a": None})
    lines = plain_logging.getvalue().splitlines()
    assert lines == [
        'WARNING:scriptpool.client:reply_dispatcher_reconnecting error="Connection refused" backoff_s=0.5 '
        "shards=[0,1] ok=true",
        "WARNING:scriptpool.client:no_fields",
        'WARNING:scriptpool.client:odd_values percent=100% quote="say \\"x\\"" empty="" nested={"a":null}',
    ]
    assert events[0]["event"] == "reply_dispatcher_reconnecting" and events[0]["backoff_s"] == 0.5
    assert events[0]["error"] == "Connection refused" and events[0]["shards"] == [0, 1]


def test_the_json_renderer_keeps_the_bare_event_and_the_fields_as_keys(plain_logging: io.StringIO) -> None:
    """Next to a plain handler, ``configure_logging`` still renders ``"event"`` as the name alone
    with each field its own key (and no ``message`` key), while the plain handler shows both."""
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    get_logger("client").warning("reply_invalid", job="j1", problem="not msgpack")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "reply_invalid" and record["job"] == "j1" and record["problem"] == "not msgpack"
    assert "message" not in record
    assert plain_logging.getvalue().strip().endswith('reply_invalid job=j1 problem="not msgpack"')


def test_an_event_renders_as_structlogs_processor_chain_renders_it() -> None:
    """The JSON formatter's short path for our events (no traceback) gives the object
    structlog's chain of processors gives the same record: the same keys in the same order
    (event, level, logger, the fields, timestamp) and the same values, odd ones included, and
    what a record factory adds (a log correlation's trace id)."""
    import structlog

    stream = io.StringIO()
    handler = configure_logging(json=True, stream=stream)
    formatter = handler.formatter
    assert formatter is not None
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    logging.getLogger().addHandler(keep)
    make_record = logging.getLogRecordFactory()

    def with_trace_ids(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.otelTraceID = "0af7651916cd43dd8448eb211c80319c"  # as a log correlation adds it
        return record

    logging.setLogRecordFactory(with_trace_ids)
    try:
        log = get_logger("worker")
        log.info("execution", job="j1", shard=0, ms=0.0097, error_code=None, name="clash", text='ünï "q"')
        log.warning("odd", value=object(), nested={"a": [1, None]}, **{"not an identifier": 1})
        log.error("no_fields")
    finally:
        logging.setLogRecordFactory(make_record)
        logging.getLogger().removeHandler(keep)
    assert len(seen) == 3
    for record in seen:
        fast = json.loads(formatter.format(record))
        # What the formatter's long path hands the chain: the bare event, no message formatted
        # by another handler (pytest's, here).
        msg, args = record.msg, record.args
        message = record.__dict__.pop("message", None)
        record.msg, record.args = event_name(record), ()
        try:
            chain = json.loads(structlog.stdlib.ProcessorFormatter.format(formatter, record))  # type: ignore[arg-type]
        finally:
            record.msg, record.args = msg, args
            if message is not None:
                record.message = message
        assert list(fast) == list(chain) and list(fast)[:3] == ["event", "level", "logger"]
        assert list(fast)[-1] == "timestamp"
        fast.pop("timestamp"), chain.pop("timestamp")
        assert fast == chain
    first = json.loads(formatter.format(seen[0]))
    assert first["name_"] == "clash"  # a LogRecord attribute's name
    assert first["otelTraceID"] == "0af7651916cd43dd8448eb211c80319c"


def test_event_name_of_any_record() -> None:
    """``event_name`` is our event's bare name, and any other record's message."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep()
    logger = logging.getLogger("scriptpool.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        get_logger("test").info("deployed", version=3)
        logger.info("plain %s", "text")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert [event_name(r) for r in seen] == ["deployed", "plain text"]
    assert seen[0].getMessage() == "deployed version=3"


def test_python_warnings_become_one_event_each() -> None:
    """Once logging is configured, a warning is one ``python_warning`` event with its category,
    its text on one line and where it came from; not lines of text on stderr."""
    stream = io.StringIO()
    before = warnings.showwarning
    try:
        configure_logging(json=True, stream=stream)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("running as root:\n\n  not recommended", UserWarning, stacklevel=1)
    finally:
        warnings.showwarning = before
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert (record["event"], record["category"], record["text"]) == (
        "python_warning",
        "UserWarning",
        "running as root: not recommended",
    )
    assert record["source"].startswith(__file__)


def _settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, artifact_key=TEST_ARTIFACT_KEY, shards=1)


def _wait_for(read: Any, text: str, process: subprocess.Popen[bytes], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        seen = read()
        if text in seen:
            return seen
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} from the worker: {seen[-3000:]}")


@pytest.mark.parametrize("how", ["scriptpool", "plain celery"])
def test_a_worker_off_a_terminal_writes_only_json_lines(redis_url: str, tmp_path: Path, how: str) -> None:
    """stdout and stderr to a file, as under systemd or Docker: every line, from start to a
    SIGTERM stop, is one JSON object; the banner is one ``worker_starting`` event with the solo
    pool's concurrency 1 (with ``scriptpool worker``'s command and with the README's plain
    ``celery ... --pool solo``); Celery's warning about root is a ``python_warning`` event; the
    shutdown is an event, not Celery's line."""
    argv = worker_argv(_settings(redis_url), [0], name=f"json{os.getpid()}@test")
    if how == "plain celery":
        at = argv.index("--concurrency")
        del argv[at : at + 2]
    output = tmp_path / "worker.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            argv, env=worker_env(_settings(redis_url)), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=sink,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for(output.read_text, " ready.", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [line for line in output.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        record = json.loads(line)  # every line: one JSON object, nothing else
        assert isinstance(record, dict)
        records.append(record)
    events = [r["event"] for r in records]
    (starting,) = [r for r in records if r["event"] == "worker_starting"]
    assert (starting["pool"], starting["concurrency"], starting["queues"]) == ("solo", 1, ["sp.shard.0"])
    assert starting["tasks"] == ["scriptpool.execute"] and starting["transport"].startswith("redis://")
    assert events[-1] == "worker_shutting_down"
    if os.geteuid() == 0:  # Celery warns about root; here as an event with its text on one line
        (warned,) = [r for r in records if r["event"] == "python_warning"]
        assert warned["category"] == "SecurityWarning" and "superuser privileges" in warned["text"]


def test_a_worker_on_a_terminal_keeps_the_banner_with_the_true_concurrency(redis_url: str) -> None:
    """On a terminal the banner stays, for people, and says ``concurrency: 1 (solo)``."""
    argv = worker_argv(_settings(redis_url), [0], name=f"tty{os.getpid()}@test")
    main, child = pty.openpty()
    process = subprocess.Popen(
        argv, env=worker_env(_settings(redis_url)), cwd=ROOT, stdin=child, stdout=child, stderr=child,
        start_new_session=True,
    )  # fmt: skip
    os.close(child)
    received = bytearray()

    def read() -> str:
        while select.select([main], [], [], 0)[0]:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the worker is gone
                break
            if not chunk:
                break
            received.extend(chunk)
        return received.decode(errors="replace")

    try:
        shown = _wait_for(read, " ready", process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        os.close(main)
    assert "[queues]" in shown and "concurrency: 1 (solo)" in shown, shown[-3000:]
