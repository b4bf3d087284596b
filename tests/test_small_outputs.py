"""Small output defects (issue 21, item 17): whole counts as whole numbers, a combined report
whose version, sha256 and codec mean something, units on every figure of ``run --local``, and a
package graph that needs no venv."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scriptpool.cli import main
from scriptpool.config import Limits
from scriptpool.registry import Registry, RolloutRules, Tally
from scriptpool.runtime import Executor
from tests import abi, guests
from tests.conftest import EXAMPLES, ROOT
from tests.test_cli import OK, cli_env

__all__ = ["cli_env"]  # a fixture this module uses, imported from the CLI tests


def test_rollout_status_json_counts_whole_numbers_as_integers(
    cli_env: str, capsys: pytest.CaptureFixture[str], registry: Registry, tmp_path: Path
) -> None:
    """``rollout status --json``: the counts of runs and calls are integers (``3``, not
    ``3.0``); the times and the sums of deltas stay numbers with fractions."""
    registry.deploy("test", "9", guests.writes(b'{"v":1}'))
    candidate = registry.start_rollout("test", "9", guests.writes(b'{"v":1}'), RolloutRules())
    tally = Tally(match=3, instructions_delta=-12.5, peak_memory_delta=0.0)
    assert registry.rollouts.report("test", "9", candidate, tally) == "counted"
    capsys.readouterr()
    assert main(["rollout", "status", "test", "9", "--json"]) == OK
    text = capsys.readouterr().out
    counts = json.loads(text)["counts"]
    for name in ("compared", "match", "mismatch", "candidate_error"):
        assert type(counts[name]) is int, (name, counts[name])
    assert (counts["compared"], counts["match"]) == (3, 3) and '"compared": 3,' in text
    assert counts["instructions_delta_sum"] == -12.5 and isinstance(counts["started_at"], float)


def test_a_combined_report_says_what_ran_not_the_binding_generation(
    registry: Registry, executor: Executor
) -> None:
    """A chain's report: ``version`` 0 (each part has its own), ``sha256`` the digest of every
    part's app and module in turn (the same for the same modules, another after a redeploy),
    ``codec`` the parts' one; a join of a JSON and a MessagePack script says ``mixed``."""
    registry.define_extension_point("pricing", combine="chain")
    steps = {f"step-{s}": (EXAMPLES / "chain" / f"step_{s}.wasm").read_bytes() for s in "abc"}
    for app, wasm in steps.items():
        registry.deploy("pricing", "s", wasm, app=app)
    registry.deploy("pricing", "s", steps["step-c"], app="step-c")  # version 2 of step-c: generation 4
    execution = executor.execute("pricing", "s", {"base": 1000})
    assert execution.ok and execution.output == {"steps": ["a", "b", "c"], "total": 1111}
    ran = "".join(f"{app} {hashlib.sha256(wasm).hexdigest()}\n" for app, wasm in steps.items())
    report = execution.report
    assert (report.version, report.sha256, report.codec) == (
        0,
        hashlib.sha256(ran.encode()).hexdigest(),
        "json",
    )
    assert [(p.app, p.version) for p in execution.parts] == [("step-a", 1), ("step-b", 1), ("step-c", 2)]

    registry.define_extension_point("mixed", combine="join", reducer="first")
    registry.add_provider("shopify_functions_javy_v2", abi.wasm("wasi_msgpack_provider"))
    registry.deploy("mixed", "s", guests.ECHO, app="a-json")
    registry.deploy(
        "mixed",
        "s",
        abi.wasm("wasi_msgpack_echo", "shopify_functions_javy_v2"),
        app="b-msgpack",
        export="run",
    )
    joined = executor.execute("mixed", "s", {"n": 1})
    assert joined.ok and joined.report.codec == "mixed" and joined.report.version == 0


def test_run_local_gives_every_figure_its_unit(capsys: pytest.CaptureFixture[str]) -> None:
    """``run --local``: the memory line says KiB for the peak and for the limit, and the input
    and output lines say B for both."""
    module, payload = EXAMPLES / "discount" / "discount.wasm", EXAMPLES / "discount" / "input.json"
    assert main(["run", "--local", str(module), "--input", str(payload)]) == OK
    out = capsys.readouterr().out
    limits = Limits()
    assert f"KiB peak of {limits.memory_bytes // 1024:,} KiB (the limit of each memory)" in out
    assert f"B of {limits.input_bytes:,} B" in out and f"B of {limits.output_bytes:,} B" in out


def test_the_package_graph_needs_no_venv() -> None:
    """``python scripts/package_graph.py`` with no site-packages at all (``-I -S``: what a system
    Python without the project's dependencies has) prints the graph."""
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(ROOT / "scripts" / "package_graph.py")],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "workers -> engine:" in result.stdout and "cli -> workers:" in result.stdout
    assert result.stdout.strip().endswith("imports of another package's private modules: 0")
