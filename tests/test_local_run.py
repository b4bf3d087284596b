"""``scriptpool run --local``: function-runner's report, field by field against a reference that
follows function-runner's documented format independently of our engine; every ABI; no Redis;
limits and scale rules from an EP; profiles whose hot function is on top; and mistakes and
hostile modules answered with one named error, a good run right after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import wasmtime

from scriptpool.cli import main
from scriptpool.config.errors import (
    ForbiddenImport,
    GuestRuntimeError,
    InstructionLimitExceeded,
    InvalidArgument,
    InvalidOutput,
    MemoryLimitExceeded,
    OutputTooLarge,
    StackOverflow,
    WallClockExceeded,
)
from scriptpool.testing import free_port
from tests import abi, function_runner, guests
from tests.conftest import EXAMPLES, ROOT, TEST_ARTIFACT_KEY

OK, FAILED, USAGE = 0, 1, 2
MEMORY_IO = "shopify_function_v2"
WASI_MSGPACK = "shopify_function_v1"


def local(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``scriptpool run --local ARGV --json`` in a process of its own; Redis unreachable unless
    ``env`` says otherwise, so nothing here needs it."""
    environment = {**os.environ, "SCRIPTPOOL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    environment.pop("SCRIPTPOOL_ARTIFACT_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "scriptpool", "run", "--local", *argv],
        env={**environment, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return str(path)


def _cases(tmp_path: Path) -> list[tuple[str, list[str], dict[str, Any]]]:
    """(label, our arguments, the reference's arguments) for each module compared."""
    cases = []
    for module, given in (
        ("discount/discount.wasm", "discount/input.json"),  # C, wasi-libc
        ("cart_validation/cart_validation.wasm", "cart_validation/input.json"),  # C, a failing cart
        ("replay/bulk_discount.wasm", "replay/small_cart.json"),  # C, traps
        ("wat/hello.wat", "wat/input.json"),  # WAT
    ):
        path = EXAMPLES / module
        wasm = path.read_bytes() if path.suffix == ".wasm" else bytes(wasmtime.wat2wasm(path.read_text()))
        reference = {
            "name": path.name,
            "wasm": wasm,
            "input_value": json.loads((EXAMPLES / given).read_text()),
        }
        cases.append((module, [str(path), "--input", str(EXAMPLES / given)], reference))
    value = {"hello": "world", "n": [1, 2, 300], "nested": {"ok": True}}
    given = _write(tmp_path, "input.json", json.dumps(value))
    for guest, provider, name in (
        ("memory_io_echo", "memory_io_provider", MEMORY_IO),  # memory I/O, MessagePack
        ("wasi_msgpack_echo", "wasi_msgpack_provider", WASI_MSGPACK),  # a WASI provider, MessagePack
    ):
        guest_file = _write(tmp_path, f"{guest}.wat", abi.wat(guest, name))
        provider_file = _write(tmp_path, f"{provider}.wat", abi.wat(provider))
        reference = {
            "name": f"{guest}.wat",
            "wasm": abi.wasm(guest, name),
            "input_value": value,
            "provider": (name, abi.wasm(provider)),
        }
        cases.append(
            (guest, [guest_file, "--input", given, "--provider", f"{name}={provider_file}"], reference)
        )
    return cases


def test_json_report_is_function_runners_field_by_field(tmp_path: Path) -> None:
    """For C and WAT examples and two provider-linked modules, the first eight fields are
    function-runner's, in its order, with the values its documented semantics give (worked out
    by tests/function_runner.py on wasmtime's own WASI and linker); ours follow."""
    for label, argv, reference in _cases(tmp_path):
        result = local([*argv, "--json"])
        assert result.returncode in (OK, FAILED), (label, result.stderr)
        report = json.loads(result.stdout)
        expected = function_runner.run(**reference)
        assert list(report)[:8] == list(function_runner.FIELDS), label
        for field in function_runner.FIELDS:
            if field == "logs" and not expected["success"]:  # the error's text: theirs, ours
                assert report["logs"].startswith(expected["script_logs"]), label
                assert report["logs"] == expected["script_logs"] + report["error"]["message"], label
                continue
            if field == "output" and expected.get("invalid_output"):  # the decoder's words differ
                assert report["output"]["stdout"] == expected["output"]["stdout"], label
                assert set(report["output"]) == {"error", "stdout"}, label
                continue
            assert report[field] == expected[field], (label, field, report[field], expected[field])
        assert isinstance(report["size"], int) and isinstance(report["memory_usage"], int)
        assert report["instructions"] > 0 and report["memory_usage"] >= 64, label
        ours = {
            "error_code",
            "error",
            "codec",
            "scale_factor",
            "limits",
            "input_bytes",
            "output_bytes",
            "sha256",
        }
        assert ours <= set(report), label
        assert (result.returncode == OK) == (report["error_code"] is None), label


def test_failures_read_as_function_runner_reports_them(tmp_path: Path) -> None:
    """A trap: success false, the error's text after the logs, exit 1. Output that is not JSON:
    success true (the module ran to its end) with function-runner's invalid-output object, and
    our error code says why the pool would refuse it."""
    trapped = json.loads(
        local(
            [
                str(EXAMPLES / "replay/bulk_discount.wasm"),
                "--input",
                str(EXAMPLES / "replay/small_cart.json"),
                "--json",
            ]
        ).stdout
    )
    assert (trapped["success"], trapped["error_code"]) == (False, GuestRuntimeError.code)
    assert trapped["logs"] == "qualifying lines: 0 of 2\nscript trapped: integer_division_by_zero"
    assert trapped["error"]["detail"] == {"trap_code": "integer_division_by_zero"}
    assert trapped["output"]["stdout"] == "" and "no output" in trapped["output"]["error"]
    invalid = local(
        [
            _write(tmp_path, "bad.wasm", guests.INVALID_JSON),
            "--input",
            str(EXAMPLES / "wat/input.json"),
            "--json",
        ]
    )
    report = json.loads(invalid.stdout)
    assert invalid.returncode == FAILED
    assert (report["success"], report["error_code"]) == (True, InvalidOutput.code)
    assert report["output"]["stdout"] == "this is not json"


def test_text_report_and_no_redis_needed() -> None:
    result = local(
        [str(EXAMPLES / "discount/discount.wasm"), "--input", str(EXAMPLES / "discount/input.json")]
    )
    assert result.returncode == OK, result.stderr
    assert "outcome:      ok" in result.stdout
    # 96,008 with the slashes unescaped, as function-runner sends them; production escapes them.
    assert "instructions: 95,941 of 11,000,000" in result.stdout
    assert "qualifying lines: 2 of 3" in result.stdout


def test_what_a_script_writes_cannot_act_on_the_terminal(tmp_path: Path) -> None:
    """Escape sequences, carriage returns, C1 controls and bidirectional overrides in a script's
    logs (and in its raw output, shown when it is not JSON) print as visible escapes in the text
    report; the JSON report carries them exactly."""
    logs = "\x1b]0;owned\x07\x1b[2J\rred\x9b\u202eevil\n"
    module = _write(tmp_path, "ansi.wasm", guests.writes(b"\x1b[8mhidden", stderr=logs.encode()))
    given = _write(tmp_path, "input.json", "{}")
    text = local([module, "--input", given])
    assert text.returncode == FAILED, text.stderr
    assert not any(char in text.stdout for char in "\x1b\x07\r\x9b\u202e")
    assert "logs:         \\x1b]0;owned\\x07\\x1b[2J\\x0dred\\x9b\\u202eevil" in text.stdout
    assert "\\u001b[8mhidden" in text.stdout  # the raw output, as a JSON string
    report = json.loads(local([module, "--input", given, "--json"]).stdout)
    assert report["logs"].startswith(logs) and report["output"]["stdout"] == "\x1b[8mhidden"


@pytest.mark.parametrize(
    ("module", "code"),
    [
        (guests.INFINITE_LOOP, InstructionLimitExceeded.code),
        (guests.MEMORY_BOMB, MemoryLimitExceeded.code),
        (guests.RECURSION, StackOverflow.code),
        (guests.OUTPUT_FLOOD, OutputTooLarge.code),
        (guests.TRAP, GuestRuntimeError.code),
    ],
)
def test_every_limit_holds_locally_and_a_good_run_follows(
    module: bytes,
    code: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    given = str(EXAMPLES / "wat/input.json")
    assert main(["run", "--local", _write(tmp_path, "m.wasm", module), "--input", given, "--json"]) == FAILED
    assert json.loads(capsys.readouterr().out)["error_code"] == code
    assert main(["run", "--local", str(EXAMPLES / "wat/hello.wat"), "--input", given, "--json"]) == OK
    assert json.loads(capsys.readouterr().out)["output"] == {"message": "hello from WAT"}


def test_the_instruction_limit_holds_while_profiling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    loop = _write(tmp_path, "loop.wasm", guests.INFINITE_LOOP)
    argv = ["run", "--local", loop, "--input", str(EXAMPLES / "wat/input.json"), "--json"]
    assert main([*argv, "--profile", str(tmp_path / "loop.json")]) == FAILED
    report = json.loads(capsys.readouterr().out)
    assert report["error_code"] == InstructionLimitExceeded.code and report["profile"]["same_run"]
    assert report["instructions"] == 11_000_000


def test_wall_clock_holds_locally_with_a_raised_fuel_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("SCRIPTPOOL_LIMIT_FUEL", str(10**12))
    monkeypatch.setenv("SCRIPTPOOL_LIMIT_WALL_MS", "50")
    loop = _write(tmp_path, "loop.wasm", guests.INFINITE_LOOP)
    for extra in ([], ["--profile", str(tmp_path / "loop.json")]):  # the profiler keeps it too
        assert (
            main(["run", "--local", loop, "--input", str(EXAMPLES / "wat/input.json"), "--json", *extra])
            == FAILED
        )
        assert json.loads(capsys.readouterr().out)["error_code"] == WallClockExceeded.code


def test_limits_and_scale_rules_come_from_an_ep(
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--ep`` takes the EP's limits and scale rules from Redis: a 400-line cart passes on a
    scaled EP where it fails under the fixed 11M budget; a 10-line cart gets the base limits."""
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", redis_url)
    monkeypatch.setenv("SCRIPTPOOL_ARTIFACT_KEY", TEST_ARTIFACT_KEY.decode())
    assert main(["ep", "define", "fixed"]) == OK
    assert main(["ep", "define", "cart", "--scale", "cart.lines=0.005"]) == OK
    capsys.readouterr()
    assert main(["ep", "show", "cart", "--json"]) == OK
    assert json.loads(capsys.readouterr().out)["scale"] == {"cart.lines": 0.005}
    module = _write(tmp_path, "lines.wasm", guests.per_byte_work(40))
    big = _write(tmp_path, "big.json", json.dumps(guests.cart(400)))
    small = _write(tmp_path, "small.json", json.dumps(guests.cart(10)))

    assert main(["run", "--local", module, "--input", big, "--ep", "fixed", "--json"]) == FAILED
    assert json.loads(capsys.readouterr().out)["error_code"] == InstructionLimitExceeded.code
    assert main(["run", "--local", module, "--input", big, "--ep", "cart", "--json"]) == OK
    report = json.loads(capsys.readouterr().out)
    assert (report["scale_factor"], report["limits"]["fuel"]) == (2.0, 22_000_000)
    assert report["instructions"] > 11_000_000
    assert main(["run", "--local", module, "--input", small, "--ep", "cart", "--json"]) == OK
    report = json.loads(capsys.readouterr().out)
    assert (report["scale_factor"], report["limits"]["fuel"]) == (1.0, 11_000_000)
    assert main(["ep", "show", "cart"]) == OK
    assert "cart.lines x 0.005" in capsys.readouterr().out


def test_profile_puts_the_hot_function_on_top(tmp_path: Path) -> None:
    """speedscope's JSON and folded stacks, weighted by instructions: ``hot`` (about 96% of the
    instructions by construction) has by far the most self weight, names from the name section."""
    out = tmp_path / "hot.json"
    result = local(
        [
            str(EXAMPLES / "wat/hot.wat"),
            "--input",
            str(EXAMPLES / "wat/input.json"),
            "--profile",
            str(out),
            "--json",
        ]
    )
    assert result.returncode == OK, result.stderr
    report = json.loads(result.stdout)
    profile = json.loads(out.read_text())
    assert profile["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    (sampled,) = profile["profiles"]
    names = [frame["name"] for frame in profile["shared"]["frames"]]
    self_weight: dict[str, int] = {}
    for stack, weight in zip(sampled["samples"], sampled["weights"], strict=True):
        leaf = names[stack[-1]]
        self_weight[leaf] = self_weight.get(leaf, 0) + weight
    ranked = sorted(self_weight, key=self_weight.__getitem__, reverse=True)
    assert ranked[0] == "hot"
    assert self_weight["hot"] > 0.9 * sum(self_weight.values())
    assert {"hot", "cold", "work"} <= set(self_weight)
    assert all(names[stack[0]] == "run" for stack in sampled["samples"])  # the entry, root of every stack
    assert 1000 <= len(sampled["samples"]) <= 2100
    meta = report["profile"]
    assert meta["same_run"] and meta["top"][0]["function"] == "hot"
    assert sum(sampled["weights"]) + meta["unsampled_instructions"] == report["instructions"]

    folded = tmp_path / "hot.folded"
    assert (
        local(
            [
                str(EXAMPLES / "wat/hot.wat"),
                "--input",
                str(EXAMPLES / "wat/input.json"),
                "--profile",
                str(folded),
            ]
        ).returncode
        == OK
    )
    lines = dict(line.rsplit(" ", 1) for line in folded.read_text().splitlines())
    assert max(lines, key=lambda stack: int(lines[stack])) == "run;hot"


def test_profile_of_a_provider_linked_module(tmp_path: Path) -> None:
    """A memory-I/O run profiles too (its finalize runs after the sampled entry)."""
    guest = _write(tmp_path, "echo.wat", abi.wat("memory_io_echo", MEMORY_IO))
    provider = _write(tmp_path, "provider.wat", abi.wat("memory_io_provider"))
    given = _write(tmp_path, "in.json", '{"a": [1, 2, 3]}')
    out = tmp_path / "echo.folded"
    result = local(
        [guest, "--input", given, "--provider", f"{MEMORY_IO}={provider}", "--profile", str(out), "--json"]
    )
    report = json.loads(result.stdout)
    assert result.returncode == OK and report["output"] == {"a": [1, 2, 3]}, result.stderr
    assert report["profile"]["same_run"] and report["profile"]["samples"] >= 1
    assert out.read_text().strip()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--local", "M"], "needs --input"),
        (["run", "--local", "M", "--input", "I", "--provider", "nofile"], "NAME=FILE"),
        (["run", "discount", "1", "--local", "M", "--input", "I"], "takes no EP SHOP"),
        (["run", "discount", "1", "--profile", "x.json"], "--profile go with --local"),
        (["run", "discount"], "run needs EP SHOP"),
        (["run", "--local", "missing.wasm", "--input", "I"], "cannot read missing.wasm"),
        (
            ["run", "--local", "M", "--input", "I", "--profile", "/nonexistent/dir/p.json"],
            "cannot write the profile",
        ),
    ],
)
def test_mistakes_are_one_line(
    argv: list[str],
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    module = _write(tmp_path, "m.wat", (EXAMPLES / "wat/hello.wat").read_text())
    given = _write(tmp_path, "i.json", "{}")
    argv = [module if a == "M" else given if a == "I" else a for a in argv]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == USAGE, err
    assert len(err) == 1 and err[0].startswith(f"scriptpool: {InvalidArgument.code}: "), err
    assert expected in err[0]


def test_a_module_needing_a_provider_that_was_not_given(tmp_path: Path) -> None:
    guest = _write(tmp_path, "echo.wat", abi.wat("memory_io_echo", MEMORY_IO))
    result = local([guest, "--input", str(EXAMPLES / "wat/input.json")])
    assert result.returncode == FAILED
    assert (
        result.stderr.startswith(f"scriptpool: {ForbiddenImport.code}: ")
        and "--provider" not in result.stdout
    )
