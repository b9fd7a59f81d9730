"""`corea demo --no-serve`: the miniature pipeline end to end, and its verdict read back from summary.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corea.demo.pipeline import MAX_PASS_DROP, check

ROOT = Path(__file__).resolve().parents[1]


def test_check_reads_summary():
    summary = {"systems": {"COREA": {"in_domain": {"pass_at_1": 0.80, "relative_cost": 0.6, "llm_pct": 40.0}}},
               "llm": {"in_domain": {"pass_at_1": 0.82}}}
    assert check(summary)[0]
    summary["systems"]["COREA"]["in_domain"]["relative_cost"] = 1.2
    assert not check(summary)[0]
    summary["systems"]["COREA"]["in_domain"].update(relative_cost=0.5, pass_at_1=0.82 - MAX_PASS_DROP - 0.01)
    assert not check(summary)[0]


@pytest.mark.slow
def test_demo_no_serve(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        [str(Path(sys.executable).parent / "corea"), "demo", "--no-serve", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1500, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = out / "eval" / "report"
    assert (report / "report.md").exists() and list(report.glob("*.png"))
    summary = json.loads((report / "summary.json").read_text())
    ok, verdict = check(summary)
    assert ok, verdict
    assert "OK: " in run.stdout
