"""The code's layout keeps its promises: error codes spelled once, a public ``__all__`` per
package, typed packages, and tests and scripts kept apart. (Import layers are checked by
import-linter in ``make lint``.)"""

from __future__ import annotations

import ast
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from scriptpool.config import Settings
from scriptpool.config.errors import ScriptpoolError
from scriptpool.testing import make_registry
from tests import guests
from tests.conftest import ROOT, TEST_ARTIFACT_KEY

PACKAGES = ("config", "engine", "registry", "runtime", "workers", "producer", "scriptpool")
# Every package of the namespace by its importable name: the layers, the tool and the test utilities.
LAYERS = ("config", "engine", "registry", "runtime", "workers", "producer", "cli", "testing")
NAMESPACE = ("scriptpool", *(f"scriptpool.{layer}" for layer in LAYERS))


def _codes() -> set[str]:
    found: set[str] = set()
    pending: list[type[ScriptpoolError]] = [ScriptpoolError]
    while pending:
        cls = pending.pop()
        found.add(cls.code)
        pending.extend(cls.__subclasses__())
    return found


def _sources(*folders: str) -> list[Path]:
    return [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]


def test_no_error_code_is_spelled_outside_config_errors() -> None:
    """Callers name the error class (``DeadlineExceeded.code``), never the code's text."""
    codes = _codes()
    offenders = []
    for path in _sources(*PACKAGES):
        if path == ROOT / "config" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in codes:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert offenders == []


@pytest.mark.parametrize("package", NAMESPACE)
def test_every_package_is_typed_and_exports_what_its_all_names(package: str) -> None:
    """Each package ships ``py.typed`` in its own folder (where it is imported from) and an
    ``__all__`` whose every name exists."""
    module = importlib.import_module(package)
    (folder,) = module.__path__
    assert (Path(folder) / "py.typed").is_file(), package
    names = module.__all__
    assert names and all(hasattr(module, name) for name in names), package


def test_tests_and_scripts_do_not_import_each_other() -> None:
    """Benchmark scripts import the product, never the tests; tests never import scripts."""

    def imports(path: Path) -> set[str]:
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        return found

    script_modules = {path.stem for path in (ROOT / "scripts").glob("*.py")}
    for path in _sources("scripts"):
        assert "tests" not in imports(path), path
    for path in _sources("tests"):
        assert not imports(path) & (script_modules | {"scripts"}), path


# -- tests and scripts keep the contracts too -----------------------------------------------------

# The layers' names before they moved under ``scriptpool``: importing one of them would find a
# folder of the checkout (or of the user's current directory), never the installed package.
OLD_TOP_LEVEL = {"config", "engine", "registry", "workers", "producer", "runtime"}

# Tests and scripts that may import private modules (``scriptpool.<layer>._name``) of a layer,
# and why. Everything else uses what the layer's ``__init__`` (or ``scriptpool.testing``) exports.
PRIVATE_ALLOWED: dict[str, set[str]] = {
    # The C API binding, the Wasm-side constants and the engine's internals are what these test.
    "tests/test_capi.py": {"scriptpool.engine"},
    "tests/test_engine.py": {"scriptpool.engine", "scriptpool.workers", "scriptpool.runtime"},
    "tests/test_host_calls.py": {"scriptpool.engine"},
    "tests/test_endurance.py": {"scriptpool.engine"},
    "tests/faults/test_boundary_guests.py": {"scriptpool.engine"},
    "tests/faults/test_hostile.py": {"scriptpool.engine"},
    # The ABI glue, module rewriting and wire codecs, checked part by part.
    "tests/test_abi.py": {
        "scriptpool.engine",
        "scriptpool.registry",
        "scriptpool.workers",
        "scriptpool.runtime",
    },
    "tests/test_named_failures.py": {"scriptpool.workers", "scriptpool.runtime", "scriptpool.cli"},
    "scripts/bench_abi.py": {"scriptpool.engine", "scriptpool.registry"},
    "scripts/bench_engine.py": {"scriptpool.workers", "scriptpool.runtime"},  # telemetry's cost
    # The tracing work per call, in process: the client's and the worker's span makers.
    "scripts/bench_tracing.py": {"scriptpool.producer", "scriptpool.workers"},
    # The bounded compile (a subprocess with limits) and the module structure reader, driven with
    # hostile modules directly.
    "tests/test_compile_bombs.py": {"scriptpool.registry"},
    "tests/faults/test_boundary_compile.py": {"scriptpool.registry"},
    "tests/faults/test_security.py": {"scriptpool.engine", "scriptpool.registry"},
    # The client's parts (lanes, waiters, breakers, the publisher, the reply dispatcher) and the
    # worker's reply pusher, invalidation listener and shadow runner, each fed what a whole pool
    # cannot be made to produce.
    "tests/test_batching.py": {"scriptpool.producer", "scriptpool.workers", "scriptpool.runtime"},
    "tests/test_fair_share.py": {"scriptpool.workers"},  # the fair queue, alone
    "tests/test_replies_hostile.py": {"scriptpool.producer"},
    "tests/test_parts.py": {"scriptpool.producer", "scriptpool.workers", "scriptpool.runtime"},
    "tests/test_publisher.py": {"scriptpool.producer"},
    "tests/test_limits_ranges.py": {"scriptpool.producer"},
    "tests/faults/test_boundary_settings.py": {"scriptpool.producer"},
    "tests/test_rollout.py": {"scriptpool.workers", "scriptpool.runtime", "scriptpool.cli"},
    # The command line's parser, command table and output helpers, which only the tool exports.
    "tests/test_cli.py": {"scriptpool.cli"},
    "tests/test_cli_startup.py": {"scriptpool.cli"},
    "tests/test_product.py": {"scriptpool.cli"},
    "tests/test_bench.py": {"scriptpool.cli"},
    "tests/test_scaling.py": {"scriptpool.cli"},
    # The input queries' caches and projections on either side of the queue, checked directly
    # (schemas and plans compiled once per process, the loaders' memo, a stale job's refusal).
    "tests/test_input_query_host.py": {"scriptpool.runtime", "scriptpool.producer"},
    # The worker's data cache, charged per entry as it is built (what its memory bound rests on).
    "tests/test_store_reads.py": {"scriptpool.runtime"},
    # The quota gate a worker's job loop calls, driven as two workers (and a dead one) would.
    "tests/test_quotas.py": {"scriptpool.workers"},
    "tests/test_quota_pool.py": {"scriptpool.workers"},
    "tests/test_serving_loop.py": {"scriptpool.workers"},
    "tests/test_linger.py": {"scriptpool.workers"},
    "tests/test_reply_session.py": {
        "scriptpool.workers"
    },  # the worker's reply session, alone  # LINGER_S, what the prefork test compares with
    "tests/test_serving_hostile.py": {"scriptpool.workers"},  # the fair queue, alone
    # The worker's usage recorder, driven with failing and hostile Redis directly (a pool cannot
    # be made to lose a flush on cue).
    "tests/test_usage.py": {"scriptpool.workers"},
    # Settings' internal bounds and the keys the repository publishes (never to be accepted).
    "tests/test_artifact_key.py": {"scriptpool.config"},
    "tests/test_client_robustness.py": {"scriptpool.config"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, ``from m import n`` giving ``m.n`` too, of every
    ``import_module("m")`` or ``__import__("m")`` with a literal name, and of every string in it
    that is Python code importing something (a child process's program)."""
    found: list[tuple[int, str]] = []
    pending = [(0, ast.parse(path.read_text()))]
    while pending:
        offset, tree = pending.pop()
        for node in ast.walk(tree):
            line = offset + getattr(node, "lineno", 0)
            if isinstance(node, ast.Import):
                found += [(line, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found += [(line, node.module)] + [(line, f"{node.module}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Call) and (named := _imported_by_name(node)) is not None:
                found.append((line, named))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
                try:
                    code = ast.parse(textwrap.dedent(node.value))
                except SyntaxError:
                    continue  # prose, not a program
                pending.append((line - 1, code))
    return found


def _imported_by_name(call: ast.Call) -> str | None:
    """The module ``call`` imports if it names it by a literal string (``importlib.import_module``,
    however it was imported, or ``__import__``), else None."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in {"import_module", "__import__"} or not call.args:
        return None
    first = call.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def test_tests_and_scripts_import_the_namespace_and_its_public_names() -> None:
    """No test or script (nor a program one runs in a child process) imports a layer by its old
    top-level name, and none imports a private module of scriptpool outside ``PRIVATE_ALLOWED``."""
    old, private = [], []
    for path in _sources("tests", "scripts"):
        where = str(path.relative_to(ROOT))
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] in OLD_TOP_LEVEL:
                old.append(f"{where}:{line} {module}")
            is_private = any(part.startswith("_") and not part.startswith("__") for part in parts[1:])
            if parts[0] == "scriptpool" and is_private:
                layer = ".".join(parts[:2])
                if layer not in PRIVATE_ALLOWED.get(where, set()):
                    private.append(f"{where}:{line} {module}")
    assert old == [], f"old top-level names (use scriptpool.<layer>): {old}"
    assert private == [], f"private modules (use the public name, or allow with a reason): {private}"


def test_the_import_check_finds_old_names_and_private_modules(tmp_path: Path) -> None:
    """The check above sees imports in code, in nested functions and in child programs."""
    sample = tmp_path / "sample.py"
    # Written with <...> around the names, so that this file's own check does not take it as code.
    program = (
        "import <config>\n"
        "def f():\n"
        "    from <scriptpool.cli._pool_commands> import <worker_argv>\n"
        "CHILD = '''\nfrom <workers> import <Executor>\n'''\n"
        "PROSE = 'nothing to import here'\n"
        "LAYER = importlib.import_module('<config.errors>')\n"
        "OTHER = __import__('<producer>')\n"
        "BUILT = import_module(f'baseline_{name}')\n"
    )
    sample.write_text(program.replace("<", "").replace(">", ""))
    assert sorted(_imports(sample)) == [
        (1, "config"),
        (3, "scriptpool.cli._pool_commands"),
        (3, "scriptpool.cli._pool_commands.worker_argv"),
        (5, "workers"),
        (5, "workers.Executor"),
        (8, "config.errors"),
        (9, "producer"),
    ]


TEST_SERVERS = {
    "EmbeddedRedis",
    "EmbeddedSentinelSet",
    "find_redis_server",
    "free_port",
    "local_pool",
    "worker_argv",
    "percentiles",
    "rss_mb",
    "TRIVIAL_WAT",
}


def test_test_servers_live_in_scriptpool_testing_only() -> None:
    """``scriptpool`` exports the host API and no test server; the tool exports only ``main``;
    ``scriptpool.testing`` exports every test utility, each of which resolves."""
    import scriptpool
    import scriptpool.cli
    import scriptpool.testing

    assert not TEST_SERVERS & set(scriptpool.__all__)
    assert not any(hasattr(scriptpool, name) for name in TEST_SERVERS)
    assert scriptpool.cli.__all__ == ["main"]
    assert not any(hasattr(scriptpool.cli, name) for name in TEST_SERVERS)
    assert set(scriptpool.testing.__all__) >= TEST_SERVERS
    assert all(getattr(scriptpool.testing, name) is not None for name in scriptpool.testing.__all__)


def test_an_installed_scriptpool_ignores_the_current_folders_config_and_workers(
    tmp_path: Path, redis_client: object, redis_url: str
) -> None:
    """From a folder with a ``config.py``, a ``workers`` package and modules named like every
    other old layer (each raising when imported), the installed ``scriptpool``: ``--version``,
    ``from scriptpool import Client, Settings`` and a call, ``scriptpool worker`` serving a
    script, and ``scriptpool run`` through it, all work. Before the layers moved under
    ``scriptpool`` (``import config``), the first import of one of them took the user's file."""
    folder = tmp_path / "host"
    (folder / "workers").mkdir(parents=True)
    trap = "raise ImportError('the current folder\\'s {} was imported, not scriptpool\\'s')\n"
    (folder / "workers" / "__init__.py").write_text(trap.format("workers"))
    for name in OLD_TOP_LEVEL - {"workers"}:
        (folder / f"{name}.py").write_text(trap.format(name))
    settings = Settings(redis_url=redis_url, artifact_key=TEST_ARTIFACT_KEY, shards=1)
    make_registry(settings, deploy={("test", "shop"): guests.ECHO})
    # As installed: no checkout on the path, none of the caller's own settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIPTPOOL_") and k != "PYTHONPATH"}
    env.update(settings.to_env())
    bin_dir = Path(sys.executable).parent

    def run(*argv: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            argv, cwd=folder, env=env, input=stdin, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    assert run(str(bin_dir / "scriptpool"), "--version").strip()
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [str(bin_dir / "scriptpool"), "worker", "--shards", "0", "--name", "layout@test"],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while " ready." not in log.read_text(errors="replace"):
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        ran = json.loads(
            run(
                str(bin_dir / "scriptpool"), "run", "test", "shop", "--input", "-", "--json", stdin='{"n": 1}'
            )
        )
        assert ran["status"] == "ok" and ran["output"] == {"n": 1}, ran
        program = (
            "import json\n"
            "from scriptpool import Client, Settings\n"
            "with Client(Settings.from_env()) as client:\n"
            "    outcome = client.run('test', 'shop', {'n': 2}, timeout=10)\n"
            "print(json.dumps([outcome.status, outcome.output]))\n"
        )
        assert json.loads(run(str(bin_dir / "python"), "-c", program)) == ["ok", {"n": 2}]
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=20)
