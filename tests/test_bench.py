"""`scriptpool bench` runs end to end and reports every stage. It asserts shape, never timing."""

from __future__ import annotations

import json

import pytest

from scriptpool.cli import main
from scriptpool.cli._bench import STAGES


@pytest.mark.slow
def test_tiny_bench_reports_every_stage_and_reference(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny bench starts its own Redis and workers, and reports stages, throughput and ratios
    (``--json``: one JSON object on stdout, the progress on stderr)."""
    monkeypatch.setenv("SCRIPTPOOL_REDIS_URL", "redis://127.0.0.1:1/0")  # a private pool ignores it
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
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["failures"] == 0
    for run in ("ours_serial", "ours_concurrent"):
        assert list(result[run]) == STAGES
        for stage in STAGES:
            assert set(result[run][stage]) == {"p50", "p95", "p99"}
    assert result["ours_serial"]["total"]["p50"] > 0
    for reference in ("floor", "in_process", "naive_celery"):
        assert result[reference]["p50"] > 0
    assert result["throughput_per_s"] > 0
    assert set(result["ratios"]) == {"ours_over_floor_p50", "ours_over_in_process_p50", "ours_over_naive_p50"}


@pytest.mark.slow
def test_sustained_asyncio_bench_reports_seconds_and_batching(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--duration`` runs the concurrent phase for that long and reports each whole second;
    ``--asyncio`` drives it with coroutines; both report how many jobs a message carried. The
    text report names every stage and the ratios."""
    monkeypatch.delenv("SCRIPTPOOL_REDIS_URL", raising=False)
    argv = ["bench", "--duration", "2", "--asyncio", "--concurrency", "8", "--serial", "10"]
    assert main([*argv, "--references", "10"]) == 0
    printed = capsys.readouterr().out
    assert "sustained for 2.0 s: slowest second" in printed and "jobs per message" in printed
    for stage in STAGES:
        assert stage in printed
    assert "ratios (p50)" in printed
    assert "(concurrent, 8 asyncio)" in printed
