"""What a host program gets from ``producer``: a light import, and a library that never writes to
its stdout and logs only through the standard ``logging`` machinery."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from scriptpool.testing import free_port
from tests.conftest import ROOT


def run_host(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter, as a host program."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_the_host_import_loads_no_worker_side() -> None:
    """``from scriptpool.producer import Client`` in a fresh interpreter loads neither Celery,
    kombu, wasmtime, jsonschema, structlog nor any package of the worker side."""
    result = run_host(
        """
        import sys
        from scriptpool.producer import Client
        heavy = ("celery", "kombu", "wasmtime", "jsonschema", "structlog")
        heavy += tuple(f"scriptpool.{name}" for name in ("workers", "runtime", "engine", "registry", "cli"))
        print(sorted(name for name in heavy if name in sys.modules))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


HOST_WITH_REDIS_DOWN = """
    import logging, sys
    from scriptpool.config import Settings
    from scriptpool.producer import Client
    {configure}
    with Client(Settings(redis_url="redis://127.0.0.1:{port}/0", shards=1)) as client:
        outcome = client.run("discount", "1", {{}}, timeout=0.3, fallback=[])
        import time; time.sleep(0.3)  # the reply reader's reconnect warnings
    assert outcome.error_code == "broker_unavailable", outcome
"""


def test_the_library_writes_nothing_to_the_hosts_stdout() -> None:
    """With Redis unreachable, a host that configures nothing sees nothing on stdout or stderr;
    one that configures logging gets our warnings there, as records of ``scriptpool.*``."""
    silent = run_host(HOST_WITH_REDIS_DOWN.format(configure="", port=free_port()))
    assert silent.returncode == 0, silent.stderr
    assert silent.stdout == "" and silent.stderr == ""

    configured = run_host(
        HOST_WITH_REDIS_DOWN.format(configure="logging.basicConfig(level=logging.WARNING)", port=free_port())
    )
    assert configured.returncode == 0, configured.stderr
    assert configured.stdout == ""
    assert "WARNING:scriptpool.client:reply_dispatcher_reconnecting" in configured.stderr
