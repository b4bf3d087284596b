"""Fixtures: a real private redis-server per session, flushed per test, the engine parts, and the
one factory of registry fixtures (:func:`deployer_fixture`)."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
import redis

from scriptpool.config import Settings
from scriptpool.engine import Sandbox
from scriptpool.registry import Registry
from scriptpool.runtime import Executor
from scriptpool.testing import EmbeddedRedis, make_registry
from tests.faults._record import Reliability

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# Random per test session: no key the repository shows may sign anything (scriptpool.config.settings).
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


def deployer_fixture(
    define: Iterable[str] | Mapping[str, Mapping[str, Any]] = ("test",),
    *,
    settings: str = "pool_settings",
    scope: Literal["function", "module"] = "function",
    deploy: Mapping[tuple[str, str], bytes] | None = None,
    providers: Mapping[str, bytes] | None = None,
    after: Sequence[str] = (),
    name: str = "deployer",
) -> Callable[..., Registry]:
    """A fixture named ``name`` giving a registry on the Redis of the settings fixture named
    ``settings``, set up by :func:`scriptpool.testing.make_registry` (``define``, ``deploy``,
    ``providers``). Function-scoped, it works on ``redis_client``, so the test Redis is flushed
    first; module-scoped, on a client of its own, for a module whose pool outlives each test.
    The fixtures named in ``after`` are set up once the Redis is flushed, before the registry
    (``after=("workers",)``: workers first). In a module: ``deployer = deployer_fixture()``."""

    @pytest.fixture(scope=scope, name=name)
    def fixture(request: pytest.FixtureRequest, sandbox: Sandbox) -> Registry:
        store = request.getfixturevalue("redis_client") if scope == "function" else None
        for other in after:
            request.getfixturevalue(other)
        return make_registry(
            request.getfixturevalue(settings),
            define,
            deploy=deploy,
            providers=providers,
            store=store,
            sandbox=sandbox,
        )

    return fixture


registry = deployer_fixture(("discount", "test"), settings="settings", name="registry")


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
