"""`python -m bench` end to end, in its smallest form: it must keep working (`make bench`), but the
figures it prints are measurements for docs/benchmarks.md, not something a test checks. `--patience 0`:
measure once, however busy the machine (the quiet-retry would only make a smoke run slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.integration.serveproc import server_env


def test_quick_bench_runs_the_real_server_and_writes_its_report(tmp_path):
    out = tmp_path / "latency.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-naive", "--levels", "1,8", "--patience", "0",
         "--out", str(out)],
        cwd=REPO, env=server_env(tmp_path), capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["server_exit_code"] == 0
    assert report["machine"]["cpu_model"] and report["machine"]["onnxruntime_providers"]
    assert list(report["buckets"]) == ["<=16", "17-64", "65-128", "129-256"]
    for bucket in report["buckets"].values():  # Route beside the raw encoders on the same prompts
        # the default version is a cascade: most calls run only its first-stage encoder, so only
        # that floor is below every Route; the main encoder's is measured beside it
        assert 0 < bucket["first_floor"]["p50_ms"] <= bucket["route"]["p50_ms"] <= bucket["route"]["p99_ms"]
        assert bucket["floor"]["p50_ms"] > 0 and "route_minus_first_floor_p50_ms" in bucket
    assert [level["in_flight"] for level in report["sweep"]] == [1, 8]
    assert all(level["calls"] == level["latency"]["n"] for level in report["sweep"])
    assert report["route_batch"]["decisions_per_s"] > 0
    cascade = report["cascade_decisions"]  # the default profile runs the cascade: both stages decide some
    assert cascade["first"] > 0
    names = {t["name"] for t in report["targets"]}
    assert names >= {"Route p50 ms, 17-64 tokens", "p99 ms at 32 in flight"}
    assert any(n.startswith("Route p50 - first-stage floor p50 ms") for n in names)
    assert "1st-stage floor p50" in run.stdout
    assert "Route p50" in run.stdout and "wrote" in run.stdout


def test_replicas_need_an_explicit_thread_count(capsys):
    from bench.latency import main

    for argv, message in ((["--replicas", "2"], "--replicas above 1 needs --threads"),
                          (["--replicas", "0", "--threads", "1"], "--replicas must be at least 1")):
        with pytest.raises(SystemExit) as refused:
            main(argv)
        assert refused.value.code == 2 and message in capsys.readouterr().err
