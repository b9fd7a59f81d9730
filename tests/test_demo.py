"""`corea demo --no-serve`: the miniature pipeline end to end, and its verdict read back from summary.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corea.demo.pipeline import STAGES
from corea.demo.verdict import PAPER_MAX_DROP, verdict

ROOT = Path(__file__).resolve().parents[1]


def _claim_summary(corea: float, cost: float, llm: float, other: float = 0.5) -> dict:
    return {"groups": ["in_domain", "ood_math"],
            "systems": {"COREA": {g: {"pass_at_1": corea, "relative_cost": cost, "llm_pct": 40.0}
                                  for g in ("in_domain", "ood_math")},
                        "RLVR-SLM-Probe": {g: {"pass_at_1": other, "relative_cost": 0.7, "llm_pct": 50.0}
                                           for g in ("in_domain", "ood_math")}},
            "llm": {g: {"pass_at_1": llm} for g in ("in_domain", "ood_math")}}


def test_verdict_is_the_papers_claim_per_group():
    ok, lines = verdict(_claim_summary(corea=0.81, cost=0.6, llm=0.82))
    assert ok and len(lines) == 2 and "meets the paper's criterion" in lines[0] and lines[0].startswith("In-domain")
    assert "drop +1.0 points" in lines[0] and "cost -40.0%" in lines[0]
    assert not verdict(_claim_summary(corea=0.81, cost=1.2, llm=0.82))[0]  # not cheaper
    assert not verdict(_claim_summary(corea=0.82 - PAPER_MAX_DROP - 0.01, cost=0.5, llm=0.82))[0]
    # COREA above a weak LLM is never OK: LLM-only must be the most accurate row
    ok, lines = verdict(_claim_summary(corea=0.48, cost=0.75, llm=0.38, other=0.51))
    assert not ok and "LLM-only is not the most accurate row (RLVR-SLM-Probe 0.510)" in lines[0]


def test_rl_prompts_balance_taught_and_untaught_draws():
    from collections import Counter

    from corea.demo.task import RL_TAUGHT, build_splits

    sums = build_splits(0)
    assert build_splits(0) == sums  # fixed by the seed
    prompts = sums.rl_prompts()
    taught = [r for r in prompts if r.meta["taught"]]
    untaught = [r for r in prompts if not r.meta["taught"]]
    assert len({r.id for r in taught}) == RL_TAUGHT and len(untaught) == len({r.id for r in untaught}) == 180
    assert set(Counter(r.id for r in taught).values()) == {3}  # 60 taught x 3 against 180 untaught x 1
    assert {r.id for r in prompts} == {r.id for r in sums.rl} and len(sums.rl) == RL_TAUGHT + 180
    assert not {r.question for r in sums.rl} & {r.question for r in sums.eval}  # never evaluated
    assert not {r.question for r in sums.rl} & {r.question for r in sums.sft if not r.meta["taught"]}  # nor warm-started
    assert len(build_splits(0, rl_hard=60).rl_prompts()) == 120  # balanced already: each once


def test_ood_splits_are_disjoint_and_graded_by_their_kind():
    from corea.demo.task import build_ood_splits, build_splits

    ood, sums = build_ood_splits(0), build_splits(0)
    assert build_ood_splits(0) == ood  # fixed by the seed
    for evaluation, kind in ((ood.math, "math"), (ood.choice, "choice")):
        assert {r.kind for r in evaluation} == {kind}
        assert {r.meta["taught"] for r in evaluation} == {True, False}  # both sides of the skill boundary
        questions = {r.question for r in evaluation}
        assert not questions & {r.question for r in ood.sft if not r.meta["taught"]}  # untaught eval items unseen
        assert not questions & {r.question for r in sums.rl}  # never seen in RL
    for r in ood.choice:
        a, b = (int(x) for x in r.question.removeprefix("Which of these is ").rstrip("?").split(" + "))
        assert r.choices[r.letters.index(r.gold)] == str(a + b) and len(set(r.choices)) == 4
    assert all(int(r.gold) >= 0 for r in ood.math)


def _summary(pass_corea=0.8, cost_corea=0.6):
    entry = lambda p, c, llm: {"pass_at_1": p, "avg_cost": 100 * c, "relative_cost": c, "llm_pct": llm,  # noqa: E731
                               "ece": 0.1, "auroc": 0.8}
    return {"groups": {"in_domain": ["demo-sums"]},
            "llm": {"in_domain": {"pass_at_1": 0.82, "avg_cost": 100.0, "relative_cost": 1.0, "llm_pct": 100.0}},
            "systems": {"COREA": {"in_domain": entry(pass_corea, cost_corea, 40.0)},
                        "SLM-Verb": {"in_domain": entry(0.7, 0.9, 80.0) | {"ece": 0.4}}},
            "datasets": {"COREA": {"demo-sums": entry(pass_corea, cost_corea, 40.0)}}}


def test_paper_tables_and_findings_follow_the_figures():
    from corea.evaluate.paper_tables import findings, table_one, table_two

    s = _summary()
    one = table_one(s).splitlines()
    assert one[0].startswith("| System | In-domain Pass@1 (%) | In-domain Cost | In-domain vs LLM | In-domain LLM% |")
    assert one[2] == "| LLM only | 82.0 | 100.0 | +0.0% | 100.0 |"
    assert one[3] == "| SLM-Verb | 70.0 | 90.0 | -10.0% | 80.0 |"  # the paper's order, not the summary's
    assert one[4] == "| COREA | 80.0 | 60.0 | -40.0% | 40.0 |"
    assert "| SLM-Verb | – | – | – | – |" in table_two(s)  # no per-dataset entry
    text = findings(s)
    assert "80.0% pass@1, 2.0 points below LLM-only" in text and "a saving of 40%" in text
    assert "matches or beats SLM-Verb" in text and "lower ECE than the best other system (SLM-Verb" in text
    worse = findings(_summary(pass_corea=0.6, cost_corea=1.2))
    assert "22.0 points below" in worse and "dearer by 20%" in worse and "matches or beats" not in worse
    assert "82.0% pass@1, the same as LLM-only (82.0%)" in findings(_summary(pass_corea=0.82))
    assert "1.0 points above LLM-only" in findings(_summary(pass_corea=0.83))
    assert "Against RLVR-SLM-Verb" not in text and "barely separates" not in text
    ood = _summary()
    ood["systems"]["COREA"]["in_domain"]["auroc"] = 0.55
    ood["systems"]["RLVR-SLM-Verb"] = {"in_domain": {"pass_at_1": 0.7, "relative_cost": 0.3, "llm_pct": 5.0,
                                                     "ece": 0.45, "auroc": 0.5}}
    text = findings(ood)
    assert ("Against RLVR-SLM-Verb (the same RL without the confidence term): the LLM answers 40% vs 5% of the "
            "questions, ECE 0.100 vs 0.450, AUROC 0.550 vs 0.500.") in text
    assert "barely separates right from wrong answers (AUROC below 0.6)" in text


@pytest.mark.slow
def test_demo_quick_has_every_system_in_every_group(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        [str(Path(sys.executable).parent / "corea"), "demo", "--quick", "--no-serve", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1500, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for n in range(1, STAGES + 1):
        assert f"[{n}/{STAGES}]" in run.stdout
    assert "The paper's claim" in run.stdout and "In-domain: COREA pass@1" in run.stdout
    report = out / "eval" / "report"
    summary = json.loads((report / "summary.json").read_text())
    groups = ("in_domain", "ood_math", "ood_nonmath")
    assert set(summary["groups"]) == set(groups) and summary["absent_systems"] == []
    for name in ("SLM-Verb", "RLVR-SLM-Verb", "RLVR-SLM-AvgProb", "RLVR-SLM-Probe", "Router + RLVR-SLM",
                 "Brier-SLM-Verb", "COREA"):
        for g in groups:
            entry = summary["systems"][name][g]
            assert 0 <= entry["pass_at_1"] <= 1 and entry["relative_cost"] > 0 and 0 <= entry["llm_pct"] <= 100
    assert all(summary["llm"][g]["pass_at_1"] is not None for g in groups)
    text = (report / "report.md").read_text()
    assert "## Table 1" in text and "## Table 2" in text and "## What this shows" in text
    assert "COREA reaches" in text and list(report.glob("*.png"))
    strategies = {row["strategy"]: row for row in summary["strategies"]}  # online, on the COREA SLM and the LLM
    assert set(strategies) == {"cascade", "steer", "stepwise_policy", "cope"}
    assert all(0 <= r["pass_at_1"] <= 1 and r["cost_rel"] > 0 and r["questions"] > 0 for r in strategies.values())
    assert "collaboration strategies" in text and (report / "strategies_pareto.png").exists()
