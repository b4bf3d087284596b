"""Fault-suite fixtures: the figure recorder, and a private Redis each scenario may break."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from scriptpool.testing import EmbeddedRedis
from tests.conftest import RELIABILITY
from tests.faults._record import Figure

Recorder = Callable[..., None]


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Recorder:
    """``reliability(number, title, load=, fault=, asserted=, figures=)`` adds this test's figures
    to its scenario's row in RELIABILITY.md. Call it after the assertions, so only a passing
    test reports figures."""
    collector = request.config.stash[RELIABILITY]
    command = f"pytest {request.node.nodeid}"

    def record(
        number: int, title: str, *, load: str, fault: str, asserted: str, figures: dict[str, Figure]
    ) -> None:
        collector.record(
            number, title, load=load, fault=fault, asserted=asserted, command=command, figures=figures
        )

    return record


@pytest.fixture(scope="module")
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test module's own, so killing it cannot disturb other tests."""
    with EmbeddedRedis() as server:
        yield server
