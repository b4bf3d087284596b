"""The product surface: compose file, README and CLI agree with the code; user mistakes print one
clear line and exit non-zero, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from scriptpool.cli import main
from scriptpool.cli._cli import build_parser
from scriptpool.cli._pool_commands import parse_shards
from scriptpool.config import Settings
from scriptpool.config.environment import VARIABLES, markdown_table
from scriptpool.testing import free_port
from tests import guests
from tests.conftest import ROOT, TEST_ARTIFACT_KEY

ENVIRONMENT = {variable.name for variable in VARIABLES}
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
README = (ROOT / "README.md").read_text()


def test_compose_workers_cover_every_shard_once_with_valid_cli_commands() -> None:
    """One worker service per shard; each command parses with the real CLI and names its shard."""
    services = COMPOSE["services"]
    env = services["worker-0"]["environment"]
    shards = int(env["SCRIPTPOOL_SHARDS"])
    workers = {name: svc for name, svc in services.items() if name.startswith("worker-")}
    assert sorted(workers) == [f"worker-{n}" for n in range(shards)]
    for name, svc in workers.items():
        args = build_parser().parse_args(svc["command"])
        assert args.command == "worker"
        assert parse_shards(args.shards, shards) == [int(name.split("-")[1])]
    demo = build_parser().parse_args(services["demo"]["command"])
    assert demo.command == "demo" and demo.external


# The standard OpenTelemetry variables compose gives the workers (README "Traces").
OTEL_VARIABLES = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"}


def test_compose_environment_names_exist_and_build_valid_settings() -> None:
    """Every SCRIPTPOOL_* name in compose is one Settings reads, and together they are valid;
    the others are OpenTelemetry's standard variables."""
    for svc in COMPOSE["services"].values():
        for name, value in (svc.get("environment") or {}).items():
            assert name in ENVIRONMENT or name in OTEL_VARIABLES, f"compose sets unknown {name}"
            assert isinstance(value, str)
        if svc.get("environment"):
            settings = Settings.from_env(svc["environment"])
            # The key is generated into a volume on first start, never written in the file.
            assert settings.artifact_key_file and not settings.artifact_key
            assert settings.redis_url.startswith("redis://redis:")


def test_compose_redis_persists_with_aof_and_prometheus_scrapes_every_worker() -> None:
    """Redis runs with appendonly; Prometheus targets are exactly the workers' metrics ports."""
    redis_cmd = COMPOSE["services"]["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    workers = sorted(n for n in COMPOSE["services"] if n.startswith("worker-"))
    port = COMPOSE["services"]["worker-0"]["environment"]["SCRIPTPOOL_METRICS_PORT"]
    assert sorted(targets) == [f"{w}:{port}" for w in workers]
    assert 'ENTRYPOINT ["scriptpool"]' in (ROOT / "Dockerfile").read_text()


def test_readme_documents_every_setting_and_the_two_commands() -> None:
    """The README's configuration table is the one generated from
    scriptpool.config.environment.VARIABLES (so it lists every variable with its default); CI runs
    the README's test command."""
    assert markdown_table(Settings().field_values()) in README
    assert "make demo" in README and "make test" in README
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, redis_url: str, redis_client: object) -> None:
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", redis_url)
    monkeypatch.setenv("SCRIPTPOOL_ARTIFACT_KEY", TEST_ARTIFACT_KEY.decode())


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_cli_user_mistakes_are_one_line(
    cli_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Missing file, unknown EP, invalid module, bad WAT, bad shard list: one line each."""
    assert main(["ep", "define", "discount"]) == 0
    capsys.readouterr()
    assert "cannot read" in one_line_error(capsys, ["deploy", "discount", "1", str(tmp_path / "nope.wasm")])
    good = tmp_path / "good.wasm"
    good.write_bytes(guests.ECHO)
    assert "unknown_extension_point" in one_line_error(capsys, ["deploy", "nope", "1", str(good)])
    junk = tmp_path / "junk.wasm"
    junk.write_bytes(b"\0asm\1\0\0\0junk")
    assert "invalid_module" in one_line_error(capsys, ["deploy", "discount", "1", str(junk)])
    bad_wat = tmp_path / "bad.wat"
    bad_wat.write_text("(module (func $x (unknown_op)))")
    assert "not valid WAT" in one_line_error(capsys, ["deploy", "discount", "1", str(bad_wat)])
    assert "forbidden_import" in one_line_error(
        capsys, ["deploy", "discount", "1", str(_write(tmp_path, "f.wasm", guests.FORBIDDEN_ENV_IMPORT))]
    )
    assert "nothing_to_roll_back" in one_line_error(capsys, ["rollback", "discount", "1"])
    assert "--shards" in one_line_error(capsys, ["worker", "--shards", "7"])
    assert main(["deploy", "discount", "1", str(good)]) == 0
    assert "version 1" in capsys.readouterr().out


def test_cli_with_redis_down_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Every command that needs Redis says it cannot reach it, in one line."""
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("SCRIPTPOOL_ARTIFACT_KEY", TEST_ARTIFACT_KEY.decode())
    module = _write(tmp_path, "m.wasm", guests.ECHO)
    for argv in (
        ["deploy", "discount", "1", module],
        ["status"],
        ["rollback", "discount", "1"],
        ["ep", "define", "x"],
    ):
        assert "cannot reach Redis" in one_line_error(capsys, argv)
    line = one_line_error(capsys, ["run", "discount", "1", "--timeout-ms", "200"])
    assert "broker_unavailable" in line or "cannot reach Redis" in line


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_readme_lists_every_wasi_call_the_sandbox_defines() -> None:
    """A script author can see in the README what each WASI function does or answers."""
    from scriptpool.engine import provided_signatures

    section = README[README.index("### The WASI calls a script may make") :]
    section = section[: section.index("\n## ")]
    for name in provided_signatures():
        if not name.startswith(("path_", "sock_")):
            assert f"`{name}`" in section, f"README does not say what {name} does"
    assert "`path_*`" in section and "`sock_*`" in section
