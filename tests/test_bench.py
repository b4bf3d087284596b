"""`scriptpool bench` runs end to end and reports every stage. It asserts shape, never timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scriptpool._bench import STAGES
from scriptpool._cli import main


@pytest.mark.slow
def test_tiny_bench_reports_every_stage_and_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny bench starts its own Redis and workers, and reports stages, throughput and ratios."""
    monkeypatch.delenv("SCRIPTPOOL_REDIS_URL", raising=False)
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--n",
        "40",
        "--concurrency",
        "4",
        "--serial",
        "20",
        "--references",
        "20",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["failures"] == 0
    for run in ("ours_serial", "ours_concurrent"):
        assert list(result[run]) == STAGES
        for stage in STAGES:
            assert set(result[run][stage]) == {"p50", "p95", "p99"}
            assert stage in printed
    assert result["ours_serial"]["total"]["p50"] > 0
    for reference in ("floor", "in_process", "naive_celery"):
        assert result[reference]["p50"] > 0
    assert result["throughput_per_s"] > 0
    assert set(result["ratios"]) == {"ours_over_floor_p50", "ours_over_in_process_p50", "ours_over_naive_p50"}
    assert "ratios (p50)" in printed


@pytest.mark.slow
def test_sustained_asyncio_bench_reports_seconds_and_batching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--duration`` runs the concurrent phase for that long and reports each whole second;
    ``--asyncio`` drives it with coroutines; both report how many jobs a message carried."""
    monkeypatch.delenv("SCRIPTPOOL_REDIS_URL", raising=False)
    out = tmp_path / "bench.json"
    argv = ["bench", "--duration", "2", "--asyncio", "--concurrency", "8", "--serial", "10"]
    assert main([*argv, "--references", "10", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["failures"] == 0
    assert result["concurrency"] == {"callers": 8, "kind": "asyncio"}
    sustained = result["sustained"]
    assert sustained["duration_s"] == 2 and sustained["per_second_min"] > 0
    assert result["jobs_per_message"] >= 1
    assert result["throughput_per_s"] > 0
    assert "sustained for 2.0 s" in printed and "jobs per message" in printed
