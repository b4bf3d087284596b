"""The command line as a new user meets it: one clear line per mistake, exit codes that say what
happened, bounded reads, JSON output everywhere, and the views of what is deployed.

Long on purpose: one test per kind of mistake or view, most of them through the ``cli_env``,
``run_cli`` and ``one_line`` helpers at the top; the file reads as the tool's contract with a
new user, which split files would scatter."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from scriptpool.cli import main
from scriptpool.cli._cli import COMMANDS, build_parser
from scriptpool.config import Settings
from scriptpool.testing import free_port
from tests import guests
from tests.conftest import EXAMPLES, ROOT, TEST_ARTIFACT_KEY
from tests.pool import pool_fixtures

OK, FAILED, USAGE, FALLBACK, UNREACHABLE = 0, 1, 2, 3, 4


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, redis_url: str, redis_client: redis.Redis) -> str:
    """The CLI pointed at the flushed test Redis, with the test artifact key."""
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", redis_url)
    monkeypatch.setenv("SCRIPTPOOL_ARTIFACT_KEY", TEST_ARTIFACT_KEY.decode())
    for name in ("SCRIPTPOOL_SHARDS", "SCRIPTPOOL_DEADLINE_MS", "SCRIPTPOOL_METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    return redis_url


def run_cli(
    argv: list[str], env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """``scriptpool ARGV`` in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "scriptpool", *argv],
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


def one_line(capsys: pytest.CaptureFixture[str], argv: list[str], expected_exit: int) -> str:
    """Run ``argv`` in process; it must exit ``expected_exit`` with exactly one line on stderr."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == expected_exit, captured.err
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert lines[0].startswith("scriptpool: ")
    return lines[0]


def test_every_argument_has_help_and_version_prints() -> None:
    """Help text on every command and argument; ``--version`` names the installed version."""

    def walk(parser: Any, path: str) -> None:
        for action in parser._actions:
            if action.dest in ("help",):
                continue
            if action.choices and hasattr(action, "_choices_actions"):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    assert helps.get(name), f"{path} {name} has no help"
                    walk(sub, f"{path} {name}")
            else:
                assert action.help, f"{path} {action.option_strings or action.dest} has no help"

    walk(build_parser(), "scriptpool")
    result = run_cli(["--version"])
    assert result.returncode == 0 and result.stdout.startswith("scriptpool 0.")


def test_usage_mistakes_are_one_line_with_one_prefix(
    cli_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unknown flags, bad --limits, bad ports and timeouts: ``scriptpool: <code>: ...``, exit 2."""
    assert main(["ep", "define", "discount"]) == OK
    capsys.readouterr()
    assert "invalid_argument" in one_line(capsys, ["deploy"], USAGE)
    assert "invalid_argument" in one_line(capsys, ["status", "--bogus"], USAGE)
    assert "--limits is not JSON" in one_line(capsys, ["ep", "define", "x", "--limits", "notjson"], USAGE)
    line = one_line(capsys, ["ep", "define", "x", "--limits", "[1]"], USAGE)
    assert "JSON object" in line and "fuel" in line
    line = one_line(capsys, ["ep", "define", "x", "--limits", '{"fule": 5}'], USAGE)
    assert "unknown limit(s): fule" in line and "memory_bytes" in line  # the valid names
    assert "positive integer" in one_line(capsys, ["ep", "define", "x", "--limits", '{"fuel": -1}'], USAGE)
    twice = ["ep", "define", "x", "--scale", "cart.lines=0.005", "--scale", "cart.lines=0.01"]
    assert "names cart.lines twice" in one_line(capsys, twice, USAGE)
    contradict = ["ep", "define", "x", "--capture-rate", "0.5", "--no-capture"]
    assert "contradict" in one_line(capsys, contradict, USAGE)
    assert "0..65535" in one_line(capsys, ["worker", "--shards", "0", "--metrics-port", "99999"], USAGE)
    line = one_line(capsys, ["run", "discount", "1", "--timeout-ms", "0"], USAGE)
    assert "milliseconds" in line and "600000" in line
    assert "milliseconds" in one_line(capsys, ["run", "discount", "1", "--timeout-ms", "nan"], USAGE)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("SCRIPTPOOL_REDIS_URL", "http://localhost:1", "SCRIPTPOOL_REDIS_URL must use one of redis://"),
        ("SCRIPTPOOL_REDIS_URL", "notaurl", "SCRIPTPOOL_REDIS_URL must be a URL"),
        ("SCRIPTPOOL_REDIS_URL", "redis://localhost:99999/0", "SCRIPTPOOL_REDIS_URL is not a valid URL"),
        ("SCRIPTPOOL_SHARDS", "abc", "SCRIPTPOOL_SHARDS must be an integer, got 'abc'"),
        ("SCRIPTPOOL_SHARDS", "0", "SCRIPTPOOL_SHARDS: shards must be at least 1"),
        ("SCRIPTPOOL_LIMIT_FUEL", "-3", "SCRIPTPOOL_LIMIT_FUEL: limit fuel must be a positive integer"),
        ("SCRIPTPOOL_METRICS_PORT", "70000", "SCRIPTPOOL_METRICS_PORT: metrics_port must be a TCP port"),
    ],
)
def test_bad_settings_name_their_variable_for_every_command(
    variable: str, value: str, expected: str, tmp_path: Path
) -> None:
    """A malformed setting is one line naming the variable, exit 2, for every command, worker too."""
    module = tmp_path / "m.wasm"
    module.write_bytes(guests.ECHO)
    env = {"SCRIPTPOOL_ARTIFACT_KEY": TEST_ARTIFACT_KEY.decode(), variable: value}
    for argv in (
        ["status"],
        ["run", "discount", "1"],
        ["deploy", "d", "1", str(module)],
        ["worker", "--shards", "0"],
    ):
        result = run_cli(argv, env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == USAGE, (argv, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("scriptpool: configuration_error: "), (argv, lines)
        assert expected in lines[0], (argv, lines)


def test_a_misspelt_setting_is_named_with_the_one_it_resembles(redis_url: str) -> None:
    """A ``SCRIPTPOOL_*`` variable that is no setting would be silently ignored: every command
    warns about it on stderr, with the closest setting, and then does its work."""
    env = {
        "SCRIPTPOOL_REDIS_URL": redis_url,
        "SCRIPTPOOL_CAPTURE_MAX_BYTES": "1024",
        "SCRIPTPOOL_WHATEVER": "1",
        "SCRIPTPOOL_TEST_ANYTHING": "1",  # the suite's own
    }
    result = run_cli(["ep", "list"], env)
    assert result.returncode == OK, result.stderr
    assert result.stderr.splitlines() == [
        "scriptpool: warning: SCRIPTPOOL_CAPTURE_MAX_BYTES is not a setting and is ignored: "
        "did you mean SCRIPTPOOL_CAPTURE_MAX_KB?",
        "scriptpool: warning: SCRIPTPOOL_WHATEVER is not a setting and is ignored "
        "(the README's Configuration lists them)",
    ]


def test_redis_problems_are_one_line_with_their_own_exit_codes(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Unreachable Redis: exit 4 for every command; a database index Redis lacks: exit 2."""
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("SCRIPTPOOL_ARTIFACT_KEY", TEST_ARTIFACT_KEY.decode())
    module = tmp_path / "m.wasm"
    module.write_bytes(guests.ECHO)
    for argv in (
        ["deploy", "discount", "1", str(module)],
        ["status"],
        ["rollback", "discount", "1"],
        ["history", "discount", "1"],
        ["ep", "define", "x"],
        ["ep", "list"],
        ["providers", "list"],
        ["run", "discount", "1", "--timeout-ms", "200"],
    ):
        assert "broker_unavailable: cannot reach Redis" in one_line(capsys, argv, UNREACHABLE), argv
    # With --json the failure is JSON too: the run's outcome, or an error object.
    assert main(["run", "discount", "1", "--timeout-ms", "200", "--json"]) == UNREACHABLE
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["status"] == "fallback" and outcome["error_code"] == "broker_unavailable"
    assert main(["status", "--json"]) == UNREACHABLE
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "broker_unavailable"

    base = redis_url.rsplit("/", 1)[0]
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", f"{base}/99")
    assert "database Redis does not have" in one_line(capsys, ["status"], USAGE)


def test_reads_are_bounded_by_the_limit(
    cli_env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``/dev/zero`` as a module, provider, input file or stdin is refused as too large at once:
    at most the limit plus one byte is read (an unbounded read would never finish)."""
    env = {"SCRIPTPOOL_REDIS_URL": cli_env, "SCRIPTPOOL_ARTIFACT_KEY": TEST_ARTIFACT_KEY.decode()}
    assert main(["ep", "define", "small", "--limits", '{"module_bytes": 1000, "input_bytes": 1000}']) == OK
    capsys.readouterr()
    cases = [
        (["deploy", "small", "1", "/dev/zero"], "module_too_large", None),
        (["deploy", "small", "1", str(_wat_of_zeros(tmp_path))], "module_too_large", None),
        (["providers", "add", "p", "/dev/zero"], "module_too_large", None),
        (["run", "small", "1", "--input", "/dev/zero"], "input_too_large", None),
        (["run", "small", "1", "--input", "-"], "input_too_large", "/dev/zero"),
    ]
    for argv, code, stdin in cases:
        if stdin is None:
            result = run_cli(argv, env, stdin=subprocess.DEVNULL)
        else:
            with open(stdin, "rb") as source:
                result = run_cli(argv, env, stdin=source)
        assert result.returncode == FAILED, (argv, result.stderr)
        assert result.stderr.startswith(f"scriptpool: {code}: "), (argv, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


def _wat_of_zeros(tmp_path: Path) -> Path:
    path = tmp_path / "big.wat"
    path.write_text("(module)" + " " * 20_000)  # text past 8x the 1,000-byte module limit
    return path


def test_input_mistakes_say_what_is_wrong(
    cli_env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Empty stdin, a file that is not JSON, a WAT syntax error with its line and column."""
    assert main(["ep", "define", "test"]) == OK
    capsys.readouterr()
    env = {"SCRIPTPOOL_REDIS_URL": cli_env, "SCRIPTPOOL_ARTIFACT_KEY": TEST_ARTIFACT_KEY.decode()}
    empty = run_cli(["run", "test", "1", "--input", "-"], env, input="")
    assert empty.returncode == USAGE and "stdin is empty" in empty.stderr
    not_json = tmp_path / "in.json"
    not_json.write_text("{nope")
    assert "is not JSON" in one_line(capsys, ["run", "test", "1", "--input", str(not_json)], USAGE)
    bad = tmp_path / "bad.wat"
    bad.write_text("(module\n  (func $f\n    (i32.bogus)))\n")
    line = one_line(capsys, ["deploy", "test", "1", str(bad)], FAILED)
    assert f"invalid_module: {bad}:3:6: not valid WAT" in line


def test_run_default_deadline_is_the_configured_one(
    cli_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --timeout-ms, ``run`` waits SCRIPTPOOL_DEADLINE_MS: no worker here, so it falls back
    after that long (exit 3), and says so in its JSON."""
    assert main(["ep", "define", "test"]) == OK
    monkeypatch.setenv("SCRIPTPOOL_DEADLINE_MS", "120")
    capsys.readouterr()
    assert main(["run", "test", "1", "--json"]) == FALLBACK
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["error_code"] == "timeout"
    assert 120 <= outcome["timings"]["total_ms"] < 1000


def test_views_of_what_is_deployed(cli_env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``ep list``, ``ep show``, ``providers list`` and ``history``, as text and as JSON."""
    assert main(["ep", "define", "discount", "--limits", '{"fuel": 5000000}']) == OK
    assert main(["providers", "add", "echo_provider", str(_write(tmp_path, "p.wasm", guests.ECHO))]) == OK
    for _ in range(2):
        assert main(["deploy", "discount", "7", str(EXAMPLES / "discount" / "discount.wasm")]) == OK
    assert main(["deploy", "discount", "7", str(EXAMPLES / "wat" / "hello.wat")]) == OK
    capsys.readouterr()

    assert main(["ep", "list", "--json"]) == OK
    (listed,) = json.loads(capsys.readouterr().out)["extension_points"]
    assert listed["name"] == "discount" and listed["limit_overrides"] == {"fuel": 5000000}
    assert main(["ep", "show", "discount"]) == OK
    shown = capsys.readouterr().out
    assert "5,000,000  (override)" in shown and "memory_bytes" in shown
    assert main(["providers", "list", "--json"]) == OK
    (provider,) = json.loads(capsys.readouterr().out)["providers"]
    assert provider["name"] == "echo_provider" and provider["bytes"] == len(guests.ECHO)
    assert main(["history", "discount", "7", "--json"]) == OK
    versions = json.loads(capsys.readouterr().out)["versions"]
    assert [(v["version"], v["active"]) for v in versions] == [(3, True), (2, False), (1, False)]
    assert versions[1]["sha256"] == versions[2]["sha256"] != versions[0]["sha256"]
    assert versions[1]["bytes"] == (EXAMPLES / "discount" / "discount.wasm").stat().st_size
    assert main(["history", "discount", "7"]) == OK
    table = capsys.readouterr().out
    assert "active" in table and table.count("yes") == 1
    assert "nothing is deployed" in (main(["history", "discount", "8"]) == OK and capsys.readouterr().out)
    assert "unknown_extension_point" in one_line(capsys, ["ep", "show", "nope"], FAILED)


def test_output_closed_early_is_not_a_traceback(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``scriptpool ... | head -1`` with and without --json: no BrokenPipeError traceback."""
    assert main(["ep", "define", "discount", "--limits", '{"fuel": 5000000}']) == OK
    env = {"SCRIPTPOOL_REDIS_URL": cli_env, "SCRIPTPOOL_ARTIFACT_KEY": TEST_ARTIFACT_KEY.decode()}
    for argv in (["ep", "show", "discount"], ["ep", "show", "discount", "--json"], ["--help"]):
        command = " ".join([sys.executable, "-m", "scriptpool", *argv]) + " | head -c 1"
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            env={**os.environ, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
        assert result.returncode in (0, 141), (argv, result.returncode, result.stderr)


def test_refusals_at_deploy_name_the_problem(
    cli_env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A module that writes through WASI but exports no memory is refused at deploy."""
    assert main(["ep", "define", "test"]) == OK
    capsys.readouterr()
    no_memory = guests.wasm(
        """(module
          (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
          (func (export "_start")))"""
    )
    line = one_line(capsys, ["deploy", "test", "1", str(_write(tmp_path, "m.wasm", no_memory))], FAILED)
    assert "invalid_module" in line and "fd_write" in line and "memory" in line


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_settings_round_trip_through_the_environment() -> None:
    """``to_env`` gives the variables that rebuild the same settings (tests and the CLI use it)."""
    settings = Settings(redis_url="redis://h:1/3", artifact_key=b"k" * 16, shards=5, metrics_port=9000)
    assert Settings.from_env(settings.to_env()) == settings


def test_apps_through_the_command_line(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``ep define --combine``, ``deploy --app [--block-on-failure]``, ``history``, ``undeploy``
    and ``status EP SHOP``: the list of apps, their versions and which one blocks."""
    assert main(["ep", "define", "multi", "--combine", "join", "--reducer", "concat:discounts"]) == OK
    apps = EXAMPLES / "apps"
    assert main(["deploy", "multi", "7", str(apps / "loyalty.wat"), "--app", "loyalty"]) == OK
    assert (
        main(["deploy", "multi", "7", str(apps / "volume.wat"), "--app", "volume", "--block-on-failure"])
        == OK
    )
    assert main(["deploy", "multi", "7", str(apps / "volume.wat"), "--app", "volume"]) == OK
    capsys.readouterr()
    assert main(["history", "multi", "7", "--json"]) == OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["apps"] == ["loyalty", "volume"]
    assert [(v["app"], v["version"], v["active"]) for v in shown["versions"]] == [
        ("loyalty", 1, True),
        ("volume", 2, True),
        ("volume", 1, False),
    ]
    assert main(["status", "multi", "7", "--json"]) == FALLBACK  # no worker runs in this test
    binding = json.loads(capsys.readouterr().out)["binding"]
    assert binding["combine"] == "join" and [a["app"] for a in binding["apps"]] == ["loyalty", "volume"]
    assert main(["undeploy", "multi", "7", "--app", "loyalty"]) == OK
    assert "script_not_found" in one_line(capsys, ["undeploy", "multi", "7", "--app", "loyalty"], FAILED)
    assert main(["ep", "define", "single"]) == OK
    assert main(["deploy", "single", "7", str(apps / "volume.wat")]) == OK
    capsys.readouterr()
    line = one_line(capsys, ["deploy", "single", "7", str(apps / "loyalty.wat"), "--app", "other"], FAILED)
    assert "too_many_apps" in line and "--combine join or chain" in line
    assert "configuration_error" in one_line(capsys, ["ep", "define", "bad", "--combine", "join"], USAGE)


def test_rollouts_through_the_command_line(
    cli_env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``rollout start`` (with the deploy's checks), ``status`` as text and JSON, ``promote`` and
    ``abort``; a rollout needs a live script, one per (EP, shop), rules in range."""
    from scriptpool.cli._rollout_commands import _RULES
    from scriptpool.registry import RolloutRules

    assert {flag: default for flag, _, default, *_ in _RULES} == {
        f"--{name.replace('_', '-')}": value for name, value in dataclasses.asdict(RolloutRules()).items()
    }
    live, candidate = tmp_path / "live.wasm", tmp_path / "candidate.wasm"
    live.write_bytes(guests.writes(b'{"v":1}'))
    candidate.write_bytes(guests.writes(b'{"v":2}'))
    assert main(["ep", "define", "discount"]) == OK
    assert "script_not_found" in one_line(
        capsys, ["rollout", "start", "discount", "9", str(candidate)], FAILED
    )
    assert main(["deploy", "discount", "9", str(live)]) == OK
    capsys.readouterr()
    line = one_line(
        capsys, ["rollout", "start", "discount", "9", str(candidate), "--shadow-rate", "2"], USAGE
    )
    assert "shadow rate must lie in (0, 1]" in line
    assert "invalid_argument" in one_line(
        capsys, ["rollout", "start", "discount", "9", str(candidate), "--promote-after", "ten"], USAGE
    )
    line = one_line(
        capsys, ["rollout", "start", "discount", "9", str(candidate), "--promote-after", "9" * 20], USAGE
    )
    assert "must lie in [1, 1,000,000,000]" in line
    not_wasm = tmp_path / "bad.wasm"
    not_wasm.write_bytes(guests.NOT_WASM)
    assert "invalid_module" in one_line(capsys, ["rollout", "start", "discount", "9", str(not_wasm)], FAILED)
    assert main(["rollout", "start", "discount", "9", str(candidate), "--promote-after", "5", "--json"]) == OK
    started = json.loads(capsys.readouterr().out)
    assert started["state"] == "shadowing" and len(started["sha256"]) == 64
    line = one_line(capsys, ["rollout", "start", "discount", "9", str(candidate)], FAILED)
    assert "rollout_in_progress" in line and "rollout status discount 9" in line
    assert main(["rollout", "status", "discount", "9"]) == OK
    text = capsys.readouterr().out
    assert "discount/9 app default: shadowing" in text and "compared 0" in text
    assert main(["status", "--json"]) == FALLBACK  # no worker here; the rollout is listed all the same
    assert [r["shop"] for r in json.loads(capsys.readouterr().out)["rollouts"]] == ["9"]
    assert main(["rollout", "promote", "discount", "9"]) == OK
    assert "promoted" in capsys.readouterr().out
    assert main(["rollout", "status", "discount", "9", "--json"]) == OK
    shown = json.loads(capsys.readouterr().out)
    assert (shown["state"], shown["reason"], shown["sha256"]) == (
        "promoted",
        "promoted by hand",
        started["sha256"],
    )
    assert main(["history", "discount", "9", "--json"]) == OK
    assert [v["version"] for v in json.loads(capsys.readouterr().out)["versions"]] == [2, 1]
    assert main(["rollout", "start", "discount", "9", str(live)]) == OK
    assert "shadowing 100% of calls, promoting after 100 compared runs" in capsys.readouterr().out
    assert main(["rollout", "abort", "discount", "9", "--json"]) == OK
    assert json.loads(capsys.readouterr().out)["state"] == "aborted"
    assert "script_not_found" in one_line(capsys, ["rollout", "abort", "discount", "9"], FAILED)
    assert "script_not_found" in one_line(capsys, ["rollout", "status", "discount", "8"], FAILED)


# -- issue 21: usage, messages, help ---------------------------------------------------------------


def test_usage_errors_are_json_when_json_is_on_the_line(
    cli_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``--json`` anywhere on the line, an argparse mistake is one JSON error object on
    stdout (exit 2), whichever parser found it and even when it stopped before ``--json``."""
    for argv in (
        ["run", "discount", "1", "--bogus", "--json"],
        ["--json", "status"],
        ["ep", "define", "--json"],
        ["depoly", "x", "--json"],
        ["status", "--timeout", "3", "--json"],
    ):
        assert main(argv) == USAGE, argv
        captured = capsys.readouterr()
        assert captured.err == "", argv
        error = json.loads(captured.out)["error"]
        assert (error["code"], error["exit_code"]) == ("invalid_argument", USAGE), argv
        assert "\n" not in error["message"], argv


def test_bare_commands_print_their_help(capsys: pytest.CaptureFixture[str]) -> None:
    """``scriptpool`` alone prints the help (every command listed), and a command that needs an
    action (``ep``, ``rollout``, ``key``) prints its own; exit 0, nothing on stderr."""
    assert main([]) == OK
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("usage: scriptpool")
    assert all(command in captured.out for command in ("deploy", "run", "status", "rollout", "key"))
    for command, action in (("ep", "define"), ("rollout", "promote"), ("key", "generate")):
        assert main([command]) == OK
        captured = capsys.readouterr()
        assert captured.err == "" and captured.out.startswith(f"usage: scriptpool {command}"), command
        assert action in captured.out, command


def test_a_mistyped_command_action_or_option_is_told_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    """``depoly`` gets "did you mean 'deploy'", at every level: actions, choices, options."""
    assert "did you mean 'deploy'?" in one_line(capsys, ["depoly", "discount", "1", "m.wasm"], USAGE)
    assert "did you mean 'define'?" in one_line(capsys, ["ep", "defne", "x"], USAGE)
    assert "did you mean 'join'?" in one_line(capsys, ["ep", "define", "x", "--combine", "jion"], USAGE)
    line = one_line(capsys, ["status", "--jsn"], USAGE)
    assert "--jsn: did you mean --json?" in line and "see scriptpool status --help" in line
    line = one_line(capsys, ["ep", "define", "x", "--limts", "{}"], USAGE)
    assert "did you mean --limits?" in line and "see scriptpool ep define --help" in line
    line = one_line(capsys, ["xyzzy"], USAGE)  # nothing close: the list, no guess
    assert "invalid choice: 'xyzzy'" in line and "did you mean" not in line


@pytest.mark.parametrize(
    ("argv", "rule"),
    [
        (["ep", "define", "1discount"], "a-z first"),
        (["ep", "define", "Discount"], "a-z first, then a-z, 0-9"),
        (["ep", "define", "d" * 65], "1-64 characters"),
        (["history", "discount", ".shop"], "A-Z, a-z or 0-9 first"),
        (["history", "discount", "s" * 129], "1-128 characters"),
        (["deploy", "discount", "1", "m.wasm", "--export", "9start"], "A-Z, a-z or '_' first"),
        (["deploy", "discount", "1", "m.wasm", "--app", "_app"], "a-z first"),
    ],
)
def test_name_mistakes_state_every_rule(
    cli_env: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    argv: list[str],
    rule: str,
) -> None:
    """A refused EP name, shop id, app or export states the rule it broke, the first-character
    rule included (``1discount`` broke only that one)."""
    assert main(["ep", "define", "discount"]) == OK
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.wasm").write_bytes(guests.ECHO)
    line = one_line(capsys, argv, USAGE)
    assert "invalid_argument" in line and rule in line, line


def test_every_name_rule_is_in_its_message() -> None:
    """Each checker's message names its length bounds, its first character and the characters
    after it: every rule of its pattern, each shown broken alone."""
    from scriptpool.config import check_app, check_ep, check_export, check_provider, check_shop_id
    from scriptpool.config.errors import InvalidArgument

    cases = [
        (check_ep, "a" * 64, ["1a", "-a", "aB", "a" * 65, ""]),
        (check_app, "a" * 64, ["1a", "_a", "a.b", "a" * 65]),
        (check_shop_id, "A" * 128, ["-1", ".a", "_a", "a/b", "a" * 129, ""]),
        (check_export, "_" * 128, ["1a", "-a", ".a", "a/b", "a" * 129]),
        (check_provider, "_" * 128, ["1a", "-a", "a b", "a" * 129]),
    ]
    for check, longest, refused in cases:
        assert check(longest) == longest
        for value in refused:
            with pytest.raises(InvalidArgument) as caught:
                check(value)
            message = caught.value.message
            assert " first" in message and "then" in message, message
            assert f"1-{len(longest)} characters" in message, message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SCRIPTPOOL_REDIS_URL", "redis:/:pw-a1b2c3@localhost:6379/0"),
        ("SCRIPTPOOL_REDIS_URL", ":pw-a1b2c3@localhost:6379/0"),
        ("SCRIPTPOOL_REDIS_URL", "user:pw-a1b2c3@localhost:6379/0"),
        ("SCRIPTPOOL_REDIS_URL", "redis://:pw-a1b2c3@localhost:99999/0"),
        ("SCRIPTPOOL_REDIS_URL", "redis://:pw-a1b2c3@localhost:6379/zero"),
        ("SCRIPTPOOL_REDIS_URL", "http://:pw-a1b2c3@localhost:6379/0"),
        ("SCRIPTPOOL_SHARD_GROUPS", "0-1=redis:/:pw-a1b2c3@localhost:6379/0"),
    ],
)
def test_a_malformed_redis_url_is_never_echoed_with_its_password(
    variable: str, value: str, tmp_path: Path
) -> None:
    """Whatever is wrong with a Redis URL, no command prints its password: the message shows the
    URL with the credentials masked (and still names the variable)."""
    module = tmp_path / "m.wasm"
    module.write_bytes(guests.ECHO)
    env = {"SCRIPTPOOL_ARTIFACT_KEY": TEST_ARTIFACT_KEY.decode(), "SCRIPTPOOL_SHARDS": "2", variable: value}
    for argv in (
        ["status"],
        ["run", "discount", "1"],
        ["deploy", "d", "1", str(module)],
        ["worker", "--shards", "0"],
    ):
        result = run_cli(argv, env)
        assert result.returncode == USAGE, (argv, result.stderr)
        assert "pw-a1b2c3" not in result.stdout + result.stderr, (argv, result.stderr)
        assert f"scriptpool: configuration_error: {variable}" in result.stderr, (argv, result.stderr)


def test_a_redis_that_wants_a_password_is_said_to_want_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A Redis started with requirepass, and a URL without the password (or with a wrong one):
    every command says Redis answered and wants its password in the URL, never that it cannot
    be reached; exit 4 as before (the pool cannot be used); the password is never printed."""
    from scriptpool.testing import EmbeddedRedis

    module = tmp_path / "m.wasm"
    module.write_bytes(guests.ECHO)
    with EmbeddedRedis(password="pw-a1b2c3") as server:
        monkeypatch.setenv("SCRIPTPOOL_ARTIFACT_KEY", TEST_ARTIFACT_KEY.decode())
        monkeypatch.setenv("SCRIPTPOOL_SHARDS", "2")
        for url in (f"redis://127.0.0.1:{server.port}/0", f"redis://:wrong@127.0.0.1:{server.port}/0"):
            monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", url)
            for argv in (
                ["status"],
                ["ep", "list"],
                ["ep", "define", "discount"],
                ["deploy", "discount", "1", str(module)],
                ["history", "discount", "1"],
                ["providers", "list"],
                ["runs", "list"],
                ["rollout", "status", "discount", "1"],
                ["run", "discount", "1", "--timeout-ms", "2000"],
            ):
                line = one_line(capsys, argv, UNREACHABLE)
                assert "answered but refused" in line and "password in the URL" in line, (argv, line)
                assert "cannot reach" not in line and "pw-a1b2c3" not in line, (argv, line)


def test_an_empty_module_file_is_called_empty(
    cli_env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An empty .wasm (or blank .wat) is ``invalid_module: ... is empty``, not "bad magic
    number", for every command that reads a module."""
    assert main(["ep", "define", "test"]) == OK
    empty, blank = tmp_path / "empty.wasm", tmp_path / "blank.wat"
    empty.write_bytes(b"")
    blank.write_text("  \n")
    live = _write(tmp_path, "live.wasm", guests.ECHO)
    assert main(["deploy", "test", "1", str(live)]) == OK
    input_file = _write(tmp_path, "in.json", b"{}")
    capsys.readouterr()
    for path in (empty, blank):
        for argv in (
            ["deploy", "test", "1", str(path)],
            ["rollout", "start", "test", "1", str(path)],
            ["providers", "add", "p", str(path)],
            ["run", "--local", str(path), "--input", str(input_file)],
        ):
            line = one_line(capsys, argv, FAILED)
            assert "invalid_module" in line and f"{path} is empty" in line, (argv, line)
            assert "magic" not in line, line


def test_wat_syntax_and_type_errors_exit_alike(
    cli_env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A .wat that does not parse and one whose types do not check are both a module refused:
    ``invalid_module``, exit 1, as a .wasm that does not validate."""
    assert main(["ep", "define", "test"]) == OK
    capsys.readouterr()
    syntax = tmp_path / "syntax.wat"
    syntax.write_text('(module (func (export "_start") (i32.bogus)))')
    types = tmp_path / "types.wat"
    types.write_text('(module (func (export "_start") (drop (i32.add (i32.const 1)))))')
    assert "invalid_module" in one_line(capsys, ["deploy", "test", "1", str(syntax)], FAILED)
    assert "invalid_module" in one_line(capsys, ["deploy", "test", "1", str(types)], FAILED)


cli_pool_settings, cli_workers = pool_fixtures(1, {"cli0": [0]}, settings="cli_pool_settings")


def test_a_run_with_no_script_says_so_without_a_dangling_word(
    cli_pool_settings: Settings,
    cli_workers: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``run`` of an EP with nothing deployed at the shop: the worker answers script_not_found,
    and the text says so with no line ending in a word with nothing after it ("module ")."""
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", cli_pool_settings.redis_url)
    monkeypatch.setenv("SCRIPTPOOL_SHARDS", "1")
    monkeypatch.setenv("SCRIPTPOOL_ARTIFACT_KEY", TEST_ARTIFACT_KEY.decode())
    assert main(["ep", "define", "nothing-here"]) == OK
    capsys.readouterr()
    assert main(["run", "nothing-here", "1", "--timeout-ms", "10000"]) == FAILED
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("error:   script_not_found: ") for line in lines), lines
    assert all(line == line.rstrip() and not line.endswith(("module", ":")) for line in lines), lines


def test_shell_completion_goes_through_argcomplete_only_when_installed(tmp_path: Path) -> None:
    """With argcomplete importable, the shell's completion request (``_ARGCOMPLETE`` set) is
    handed to it with the full parser; without it, the request gets no output and exit 1, and
    no command runs."""
    fake = tmp_path / "argcomplete.py"
    fake.write_text(
        '"""A stand-in for argcomplete: prints the commands it was given and exits, as it does."""\n'
        "import sys\n\n\n"
        "def autocomplete(parser):\n"
        "    action = next(a for a in parser._actions if a.dest == 'command')\n"
        "    print(' '.join(sorted(action.choices)))\n"
        "    sys.exit(0)\n"
    )
    asked = {"_ARGCOMPLETE": "1", "COMP_LINE": "scriptpool de", "COMP_POINT": "13"}
    with_it = run_cli([], {**asked, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert with_it.returncode == 0, with_it.stderr
    assert with_it.stdout.split() == sorted(COMMANDS)
    without = run_cli([], asked)
    assert (without.returncode, without.stdout, without.stderr) == (FAILED, "", "")


def test_the_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    """The README's step-by-step block, pasted into bash as a new user would (only the Redis URL
    changed, to a private one): key generated, worker started, EP defined, module deployed, and
    the run answers ok."""
    from scriptpool.testing import EmbeddedRedis

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Step by step, on your own Redis", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    assert "scriptpool key generate" in block.split("scriptpool deploy", 1)[0]
    (tmp_path / "examples").symlink_to(EXAMPLES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIPTPOOL_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    with EmbeddedRedis() as server:
        script = block.replace("redis://127.0.0.1:6379/0", server.url)
        assert server.url in script
        result = subprocess.run(
            ["bash", "-c", "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert result.returncode == 0, (result.stdout, result.stderr, (tmp_path / "worker.log").read_text())
    assert "status:  ok" in result.stdout and "deployed examples/discount/discount.wasm" in result.stdout
