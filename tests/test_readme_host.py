"""The README's host examples run as they are pasted (issue 21, item 17): each Python block of
"Host API" runs in a fresh interpreter from the repository's root, against a real worker with
the discount script deployed at shop 1234, as the README's step by step leaves it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import redis

from scriptpool.config import Settings
from scriptpool.engine import Sandbox
from scriptpool.producer import Client
from scriptpool.registry import Registry
from tests.conftest import EXAMPLES, ROOT
from tests.pool import WorkerProcess, pool_fixtures

pool_settings, workers = pool_fixtures(1, {"w0": [0]})


def host_api_blocks() -> list[str]:
    """The Python blocks of the README's "Host API" section, in order."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Host API\n")
    section = readme[start : readme.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture
def deployed(
    redis_client: redis.Redis, pool_settings: Settings, sandbox: Sandbox, workers: dict[str, WorkerProcess]
) -> Settings:
    """discount at shop 1234, its module hot in the worker; the settings a host would have
    (no artifact key: a client does not need one)."""
    registry = Registry(redis_client, pool_settings, sandbox)
    registry.define_extension_point("discount")
    registry.deploy("discount", 1234, (EXAMPLES / "discount" / "discount.wasm").read_bytes())
    payload = json.loads((EXAMPLES / "discount" / "input.json").read_text())
    with Client(pool_settings) as client:
        assert client.run("discount", 1234, payload, timeout=10).ok  # compiled and hot from now on
    return Settings(redis_url=pool_settings.redis_url, shards=pool_settings.shards)


def test_the_readme_host_examples_run_as_pasted(deployed: Settings) -> None:
    """Both blocks (threaded and asyncio) exit 0 without a traceback; the threaded one applies
    the script's output, or its fallback when 50 ms were not enough on this machine, and says
    which."""
    blocks = host_api_blocks()
    assert len(blocks) == 2 and "with Client(" in blocks[0] and "run_async" in blocks[1]
    env = {**deployed.to_env(), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    env.pop("SCRIPTPOOL_ARTIFACT_KEY", None)
    expected = json.loads((EXAMPLES / "discount" / "expected_output.json").read_text())
    results = [
        subprocess.run(
            [sys.executable, "-c", block], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        for block in blocks
    ]
    for block, result in zip(blocks, results, strict=True):
        assert result.returncode == 0 and "Traceback" not in result.stderr, (block, result.stderr)
    applied, status = results[0].stdout.splitlines()[:2]
    assert status.split()[0] in ("ok", "fallback"), results[0].stdout
    shown = expected if status.startswith("ok") else {"discounts": []}
    assert applied == f"applying {shown}"
