"""Fixtures: a real private redis-server per session, flushed per test, and the engine parts."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from scriptpool.cli import EmbeddedRedis
from scriptpool.config import Settings
from scriptpool.engine import Sandbox
from scriptpool.registry import Registry
from scriptpool.workers import Executor
from tests.faults._record import Reliability

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# Random per test session: no key the repository shows may sign anything (scriptpool.config._settings).
TEST_ARTIFACT_KEY = secrets.token_hex(32).encode()


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Tests that run the CLI configure logging; every test starts without that handler."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "scriptpool"]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.WARNING)
    logging.getLogger("scriptpool.client").setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: ``SCRIPTPOOL_TEST_REDIS_URL`` if set, else a private server for the session."""
    configured = os.environ.get("SCRIPTPOOL_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on a Redis flushed before each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def settings(redis_url: str) -> Settings:
    """Settings pointing at the test Redis, with a test artifact key."""
    return Settings(redis_url=redis_url, artifact_key=TEST_ARTIFACT_KEY)


@pytest.fixture(scope="session")
def sandbox() -> Sandbox:
    """One sandbox for the session, as a worker process has."""
    return Sandbox()


@pytest.fixture
def registry(redis_client: redis.Redis, settings: Settings, sandbox: Sandbox) -> Registry:
    """A registry with the ``discount`` and ``test`` extension points defined."""
    reg = Registry(redis_client, settings, sandbox)
    reg.define_extension_point("discount")
    reg.define_extension_point("test")
    return reg


@pytest.fixture
def executor(registry: Registry, sandbox: Sandbox, settings: Settings) -> Executor:
    """An in-process executor over the test registry."""
    return Executor(registry, sandbox, settings)


RELIABILITY = pytest.StashKey[Reliability]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-report",
        metavar="PATH",
        help="write the fault suite's figures as Markdown (RELIABILITY.md) to PATH",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RELIABILITY] = Reliability()


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--reliability-report")
    reliability = session.config.stash[RELIABILITY]
    if path and reliability.records:
        Path(path).write_text(reliability.markdown())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    reliability = config.stash[RELIABILITY]
    if reliability.records:
        terminalreporter.section("fault suite figures")
        terminalreporter.write_line(reliability.markdown())
