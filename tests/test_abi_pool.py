"""The current Shopify ABIs through real worker processes: a memory-I/O module, a MessagePack
module over WASI and an untrampolined Wasm API module, with a hostile provider between them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scriptpool.config import Settings
from scriptpool.producer import Client
from scriptpool.registry import Registry
from tests import abi, guests
from tests.conftest import TEST_ARTIFACT_KEY, deployer_fixture
from tests.pool import WorkerProcess, start_workers
from tests.test_abi import API_INPUT, API_LOGS, API_OUTPUT, hostile_provider


@pytest.fixture(scope="module")
def pool_settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, artifact_key=TEST_ARTIFACT_KEY, shards=1)


@pytest.fixture(scope="module")
def workers(pool_settings: Settings) -> Iterator[list[WorkerProcess]]:
    started = start_workers(pool_settings, {"abi": [0]})
    yield started
    for worker in started:
        worker.stop()


deployer = deployer_fixture()


@pytest.fixture
def client(pool_settings: Settings, workers: list[WorkerProcess], deployer: Registry) -> Iterator[Client]:
    with Client(pool_settings) as c:
        yield c


def test_every_abi_runs_through_a_worker_and_a_hostile_provider_leaves_it_healthy(
    client: Client, deployer: Registry, workers: list[WorkerProcess]
) -> None:
    deployer.add_provider("shopify_functions_javy_v3", abi.wasm("memory_io_provider"))
    deployer.add_provider("shopify_functions_javy_v2", abi.wasm("wasi_msgpack_provider"))
    deployer.add_provider("shopify_function_v2", abi.wasm("wasm_api_provider"))
    deployer.deploy("test", "mem", abi.wasm("memory_io_echo", "shopify_functions_javy_v3"))
    deployer.deploy("test", "wasi", abi.wasm("wasi_msgpack_echo", "shopify_functions_javy_v2"), export="run")
    deployer.deploy("test", "api", abi.wasm("wasm_api_untrampolined"))
    deployer.deploy("test", "plain", guests.ECHO)

    def check_all() -> None:
        for shop, payload, output, logs in (
            ("mem", {"b": 1, "a": [2.5]}, {"b": 1, "a": [2.5]}, "echo\n"),
            ("wasi", {"b": 1, "a": 2}, {"b": 1, "a": 2}, "echo\n"),
            ("api", API_INPUT, API_OUTPUT, API_LOGS),
            ("plain", {"x": 1}, {"x": 1}, ""),
        ):
            outcome = client.run("test", shop, payload, timeout=5)
            assert outcome.status == "ok", (shop, outcome.error)
            assert outcome.output == output and list(outcome.output) == list(output)
            assert outcome.report is not None
            assert outcome.report.logs == logs
            assert outcome.report.codec == ("json" if shop == "plain" else "msgpack")
            assert outcome.report.peak_memory_bytes >= 65536

    check_all()
    pid = workers[0].process.pid
    # A provider whose finalize points past its memory, then one whose initialize traps.
    deployer.add_provider(
        "shopify_functions_javy_v4", hostile_provider(results=(0x1000, 0xFFFFFFF0, 0, 0, 0, 0))
    )
    deployer.deploy(
        "test",
        "bad",
        guests.wasm(
            '(module (import "shopify_functions_javy_v4" "memory" (memory 1)) (func (export "_start")))'
        ),
    )
    outcome = client.run("test", "bad", {}, timeout=5)
    assert (outcome.status, outcome.error_code) == ("error", "invalid_output")
    deployer.add_provider("shopify_functions_javy_v4", hostile_provider(initialize="unreachable"))
    deployer.deploy(  # another shop: the worker may still hold "bad"'s old binding for a moment
        "test",
        "bad2",
        guests.wasm(
            '(module (import "shopify_functions_javy_v4" "memory" (memory 1)) (func (export "_start")))'
        ),
    )
    outcome = client.run("test", "bad2", {}, timeout=5)
    assert (outcome.status, outcome.error_code) == ("error", "runtime_error")
    check_all()
    assert workers[0].alive and workers[0].process.pid == pid
