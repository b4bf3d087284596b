"""The command line's start-up: each command imports only what it uses, and a Ctrl-C at any
moment of it is one line and exit 130.

What a command imports is what its start-up costs (BENCHMARKS.md has the figures); these tests
pin the imports, not the milliseconds, so the gain stays on any machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from scriptpool.cli._cli import COMMANDS, build_parser
from scriptpool.cli._output import subcommands
from scriptpool.config import Settings
from scriptpool.config.wire import Job
from scriptpool.registry import Registry
from scriptpool.runtime import CaptureStore, CaptureWriter, Executor, ScriptTrace
from scriptpool.testing import TRIVIAL_WAT, free_port
from tests import guests
from tests.conftest import ROOT, TEST_ARTIFACT_KEY

INTERRUPTED = 130
# What only deploys, workers and local runs need: a command without them must not load them.
HEAVY = ("celery", "kombu", "wasmtime", "jsonschema", "structlog")

# Runs one command in process and prints which packages it left in sys.modules: the top-level ones,
# and our own layers by their names under scriptpool (scriptpool.config, scriptpool.engine, ...).
_IMPORTS = """
import json, sys
from scriptpool.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
def package(module):
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "scriptpool" else parts[0]
print(json.dumps({"code": code, "packages": sorted({package(m) for m in sys.modules})}), file=sys.stderr)
"""


def imported_by(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """The exit code of ``scriptpool ARGV`` and the top-level packages it imported."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTS, *argv],
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    report: dict[str, Any] = json.loads(result.stderr.strip().splitlines()[-1])
    report["stdout"] = result.stdout
    return report


def test_version_and_help_import_no_library() -> None:
    """``--version`` loads neither redis-py, Celery, kombu nor wasmtime (nor our config): they
    were most of its 350 ms. A command's help loads only its own module's imports."""
    version = imported_by(["--version"])
    assert version["code"] == 0 and version["stdout"].startswith("scriptpool 0.")
    assert not {
        "redis",
        "scriptpool.config",
        "scriptpool.producer",
        "scriptpool.registry",
        "scriptpool.engine",
        "scriptpool.workers",
        *HEAVY,
    } & set(version["packages"])
    run_help = imported_by(["run", "--help"])
    assert run_help["code"] == 0 and "--timeout-ms" in run_help["stdout"]
    assert not {"scriptpool.registry", "scriptpool.engine", "scriptpool.workers", *HEAVY} & set(
        run_help["packages"]
    )


def test_run_and_status_load_neither_wasmtime_nor_celery(redis_url: str, redis_client: redis.Redis) -> None:
    """``run`` and ``status`` import the client side only: no registry or engine, no Celery, no
    schema validator, and no log renderer when nothing logs; whether Redis answers (here with
    no worker: a fallback, and a shard without one) or not."""
    env = {"SCRIPTPOOL_REDIS_URL": redis_url, "SCRIPTPOOL_SHARDS": "2"}
    assert imported_by(["ep", "define", "discount"], env)["code"] == 0
    gone = {"SCRIPTPOOL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "SCRIPTPOOL_SHARDS": "2"}
    for argv, environment, code in (
        (["run", "discount", "1", "--timeout-ms", "200"], env, 3),
        (["status"], env, 3),
        (["run", "discount", "1", "--timeout-ms", "200"], gone, 4),
        (["status"], gone, 4),
    ):
        report = imported_by(argv, environment)
        assert report["code"] == code, (argv, report)
        assert not {"scriptpool.registry", "scriptpool.engine", "scriptpool.workers", *HEAVY} & set(
            report["packages"]
        ), argv


# What the workers package brings (Celery and kombu for the pool, prometheus_client for its
# metrics): the commands that run scripts in this process need none of it.
POOL_ONLY = ("celery", "kombu", "prometheus_client", "scriptpool.workers")


def test_local_runs_replays_and_captured_runs_load_no_pool(
    tmp_path: Path, redis_url: str, settings: Settings, registry: Registry, executor: Executor
) -> None:
    """``run --local``, ``runs`` and ``replay`` run on the runtime (``scriptpool.runtime``) and
    load no Celery, kombu, Prometheus client or workers package (all four came with the runtime
    while it lived in ``scriptpool.workers``); nor does importing the runtime itself."""
    wat = tmp_path / "trivial.wat"
    wat.write_text(TRIVIAL_WAT)
    (tmp_path / "input.json").write_text("{}")
    registry.deploy("test", "startup", guests.TRAP)
    trace: list[ScriptTrace] = []
    assert not executor.execute("test", "startup", {"n": 1}, trace=trace).ok
    writer = CaptureWriter(settings)
    writer.offer(Job("j1", "test", "startup", b"{}", time.time() + 5, time.time()), trace, "w")
    writer.close()
    (run,) = CaptureStore(redis.Redis.from_url(redis_url), settings).summaries()
    env = {"SCRIPTPOOL_REDIS_URL": redis_url, "SCRIPTPOOL_ARTIFACT_KEY": TEST_ARTIFACT_KEY.decode()}
    for argv, code in (
        (["run", "--local", str(wat), "--input", str(tmp_path / "input.json")], 0),
        (["runs", "list"], 0),
        (["runs", "show", run.id], 0),
        (["replay", run.id, "--json"], 1),  # the trap again: the script failed
    ):
        report = imported_by(argv, env)
        assert report["code"] == code, (argv, report)
        assert "scriptpool.runtime" in report["packages"], argv
        assert not set(POOL_ONLY) & set(report["packages"]), argv
    assert json.loads(report["stdout"])["identical"]["all"] is True
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, scriptpool.runtime; print(' '.join(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert "scriptpool.runtime" in loaded and not set(POOL_ONLY) & set(loaded)


def test_the_version_is_the_installed_distributions(tmp_path: Path) -> None:
    """``--version`` reads the version where importlib.metadata finds it (without importing it),
    from the checkout and from elsewhere."""
    from importlib.metadata import version

    for cwd in (ROOT, tmp_path):
        result = subprocess.run(
            [sys.executable, "-m", "scriptpool", "--version"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.stdout == f"scriptpool {version('scriptpool')}\n", (cwd, result.stderr)


def test_every_command_is_in_the_table_that_picks_its_module() -> None:
    """``COMMANDS`` names, for every command of the full parser, the module that defines it, so
    that building the parser of one command builds that command whole."""
    assert set(subcommands(build_parser()) or {}) == set(COMMANDS)
    for command in COMMANDS:
        alone = subcommands(build_parser([command])) or {}
        assert command in alone, command
        full = (subcommands(build_parser()) or {})[command]
        assert alone[command].format_help() == full.format_help(), command


# A Ctrl-C that arrives while ``module`` is being imported: the import raises KeyboardInterrupt,
# as the signal would, at a point that does not depend on this machine's speed.
_INTERRUPTED_IMPORT = """
import sys
module = sys.argv.pop(1)


class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            raise KeyboardInterrupt
        return None


sys.meta_path.insert(0, CtrlC())
from scriptpool.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("module", ["argparse", "scriptpool.config", "redis", "scriptpool.producer"])
def test_ctrl_c_while_the_command_loads_is_one_line(module: str, redis_url: str) -> None:
    """Ctrl-C during any import of the start-up (argparse, config, redis-py, the client) is
    ``scriptpool: interrupted`` and exit 130, not a KeyboardInterrupt traceback: nothing is
    imported before ``main`` is entered."""
    result = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_IMPORT, module, "run", "discount", "1", "--timeout-ms", "200"],
        env={**os.environ, "SCRIPTPOOL_REDIS_URL": redis_url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (INTERRUPTED, "scriptpool: interrupted\n")


# The console script's own two lines, after a timer that sends this process SIGINT.
_SIGNALLED = """
import os, signal, sys, threading

threading.Timer(float(sys.argv.pop(1)), os.kill, (os.getpid(), signal.SIGINT)).start()
from scriptpool.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("delay", [0.05, 0.1, 0.2, 0.3])
def test_ctrl_c_in_the_first_300_ms_is_one_line(
    delay: float, redis_url: str, redis_client: redis.Redis
) -> None:
    """A real SIGINT, 50 to 300 ms after the interpreter is up (inside the imports, before the
    fix), during a ``run`` that would wait 10 s for a worker: one line, exit 130."""
    env = {
        "SCRIPTPOOL_REDIS_URL": redis_url,
        "SCRIPTPOOL_ARTIFACT_KEY": TEST_ARTIFACT_KEY.decode(),
        "SCRIPTPOOL_SHARDS": "2",
    }
    subprocess.run(
        [sys.executable, "-m", "scriptpool", "ep", "define", "waits"],
        env={**os.environ, **env},
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    process = subprocess.Popen(
        [sys.executable, "-c", _SIGNALLED, str(delay), "run", "waits", "1", "--timeout-ms", "10000"],
        env={**os.environ, **env, "PYTHONFAULTHANDLER": "1"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        _, stderr = process.communicate()
        pytest.fail(f"still running 30 s after SIGINT:\n{stderr}")
    assert (process.returncode, stderr) == (INTERRUPTED, "scriptpool: interrupted\n")
