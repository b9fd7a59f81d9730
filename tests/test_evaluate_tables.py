"""Evaluation tables on records made by hand: every number below is worked out on paper.

Costs (size ratio 2): SLM rows have 10 prompt + 5 output tokens, C_SLM = 10 + 4*5 = 30; LLM rows 10 + 10,
C_LLM = 2 * (10 + 4*10) = 100, except deepmath500 q4 run 0 with 20 output tokens: 2 * (10 + 80) = 180; router
rows 20 + 2, C_router = 28. The default threshold is the LLM's pass@1 on each dataset.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest

from corea import metrics
from corea.cost import cascade_point
from corea.evaluate.cascade import (
    evaluate_system,
    join_systems,
    select_budget,
    select_max_drop,
    select_thresholds,
)
from corea.evaluate.config import ConfigError, MetricsConfig, SelectionConfig, load_eval_config
from corea.evaluate.records import RecordsError, calibration_mask, join_system, load_records
from corea.evaluate.report import build_report, compute_report
from support import record_rows as _rows
from corea.evaluate.tables import Clusters, auroc_fast, ece_fast, metric_rows, replicates

N = None
RATIO = 2.0


def hand_records() -> pd.DataFrame:
    q = lambda a, b, c, d, e, f, g, h: {("q1", 0): a, ("q2", 0): b, ("q3", 0): c, ("q4", 0): d,  # noqa: E731
                                        ("q1", 1): e, ("q2", 1): f, ("q3", 1): g, ("q4", 1): h}
    rows = []
    # deepmath500 (in_domain)
    rows += _rows("corea", "deepmath500", q((0.9, 1), (0.8, 1), (0.3, 0), (N, 0), (0.9, 1), (0.2, 0), (0.85, 0), (0.1, 0)))
    llm = _rows("llm", "deepmath500", q((0.9, 1), (0.9, 1), (0.9, 1), (0.9, 0), (0.9, 1), (0.9, 1), (0.9, 0), (0.9, 1)),
                output=10)
    for r in llm:
        if (r["id"], r["run"]) == ("q4", 0):
            r["output_tokens"] = 20
    rows += llm
    rows += _rows("slm_verb", "deepmath500", q((1.0, 1), (1.0, 0), (1.0, 0), (1.0, 0), (1.0, 0), (1.0, 0), (1.0, 0), (1.0, 0)))
    mtp = {("q1", 0): 0.95, ("q2", 0): 0.5, ("q3", 0): 0.8, ("q4", 0): 0.7,
           ("q1", 1): 0.9, ("q2", 1): 0.6, ("q3", 1): 0.76, ("q4", 1): 0.8}
    rows += _rows("rlvr", "deepmath500", q((N, 1), (N, 0), (N, 1), (N, 0), (N, 1), (N, 0), (N, 0), (N, 0)), mtp=mtp)
    rows += _rows("router", "deepmath500", q((0.9, 0), (0.3, 0), (0.8, 0), (0.2, 0), (0.8, 0), (0.9, 0), (0.1, 0), (N, 0)),
                  prompt=20, output=2)
    # gsm8k and math500 (ood_math): COREA and the LLM only
    g = lambda a, b, c, d: {("g1", 0): a, ("g2", 0): b, ("g1", 1): c, ("g2", 1): d}  # noqa: E731
    rows += _rows("corea", "gsm8k", g((0.9, 1), (0.4, 0), (0.7, 1), (N, 0)))
    rows += _rows("llm", "gsm8k", g((0.5, 1), (0.5, 1), (0.5, 1), (0.5, 0)), output=10)
    m = lambda a, b, c, d: {("m1", 0): a, ("m2", 0): b, ("m1", 1): c, ("m2", 1): d}  # noqa: E731
    rows += _rows("corea", "math500", m((0.95, 1), (0.95, 1), (0.95, 1), (0.95, 0)))
    rows += _rows("llm", "math500", m((0.5, 0), (0.5, 0), (0.5, 0), (0.5, 0)), output=10)
    return load_records(pd.DataFrame(rows))


@pytest.fixture(scope="module")
def data():
    return compute_report(hand_records(), size_ratio=RATIO, selection=SelectionConfig(enabled=False),
                          metrics=MetricsConfig(n_boot=200))


def test_records_schema_and_matching():
    records = hand_records()
    assert set(records["group"]) == {"in_domain", "ood_math"}
    joined = join_system(records, "corea", "confidence", RATIO)
    q4 = joined[(joined["dataset"] == "deepmath500") & (joined["id"] == "q4") & (joined["run"] == 0)]
    assert q4["llm_cost"].item() == 180.0 and q4["slm_cost"].item() == 30.0
    assert join_system(records, "brier", "confidence", RATIO) is None
    assert join_system(records, "rlvr", "probe_confidence", RATIO) is None  # no probe ran
    with pytest.raises(RecordsError, match="duplicate"):
        load_records(pd.concat([records, records.iloc[:1]]))
    with pytest.raises(RecordsError, match="correct"):
        load_records(records.drop(columns=["correct"]))


def test_metrics_by_hand(data):
    rows = {r.scope: r for r in data.metrics["COREA"]}
    dm = rows["deepmath500"]
    assert dm.values["pass_at_1"].value == pytest.approx(3 / 8)
    assert dm.pass_at_1_std == pytest.approx(0.125)  # runs: 2/4 and 1/4
    assert dm.values["confidence_output_ratio"].value == pytest.approx(7 / 8)
    assert dm.values["ece"].value == pytest.approx(1.45 / 7)
    assert dm.values["auroc"].value == pytest.approx(11 / 12)
    for key in ("pass_at_1", "ece", "auroc"):
        iv = dm.values[key]
        assert iv.low <= iv.value + 1e-9 and iv.value <= iv.high + 1e-9
    ood = rows["ood_math"]  # macro mean over gsm8k and math500
    assert ood.values["pass_at_1"].value == pytest.approx((0.5 + 0.75) / 2)
    assert ood.pass_at_1_std == pytest.approx(0.125)  # macro per run: 0.75, 0.5
    assert ood.values["ece"].value == pytest.approx((0.8 / 3 + 0.2) / 2)
    assert ood.values["auroc"].value == pytest.approx((1.0 + 0.5) / 2)
    assert ood.values["confidence_output_ratio"].value == pytest.approx(0.875)
    verb = {r.scope: r for r in data.metrics["SLM-Verb"]}["deepmath500"]
    assert verb.values["ece"].value == pytest.approx(0.875)
    assert verb.values["auroc"].value == pytest.approx(0.5)
    rlvr = {r.scope: r for r in data.metrics["RLVR-SLM-Verb"]}["deepmath500"]
    assert rlvr.values["confidence_output_ratio"].value == 0.0 and math.isnan(rlvr.values["ece"].value)
    router = {r.scope: r for r in data.metrics["Router + RLVR-SLM"]}["deepmath500"]
    assert router.values["auroc"].value == pytest.approx(9.5 / 12)
    assert router.values["pass_at_1"].value == pytest.approx(3 / 8)  # the RLVR-SLM's own pass@1


def test_cascade_by_hand(data):
    assert data.thresholds == {"deepmath500": 0.75, "gsm8k": 0.75, "math500": 0.0}
    assert sorted(data.absent) == ["Brier-SLM-Verb", "RLVR-SLM-Probe"]
    expected = {  # system: (pass@1, slm_cost, llm_cost, relative_cost, llm_pct) on deepmath500 at tau 0.75
        "COREA": (6 / 8, 30, 60, 90 / 110, 50),
        "SLM-Verb": (1 / 8, 30, 0, 30 / 110, 0),
        "RLVR-SLM-Verb": (6 / 8, 30, 110, 140 / 110, 100),
        "RLVR-SLM-AvgProb": (5 / 8, 30, 47.5, 77.5 / 110, 37.5),
        "Router + RLVR-SLM": (5 / 8, 43, 60, 103 / 110, 50),
    }
    for name, (acc, slm, llm, rel, pct) in expected.items():
        p = data.systems[name].at_default["deepmath500"]
        assert (p.pass_at_1, p.slm_cost, p.llm_cost, p.avg_cost, p.relative_cost, p.llm_pct) == pytest.approx(
            (acc, slm, llm, slm + llm, rel, pct)), name
        assert data.systems[name].at_default["in_domain"].pass_at_1 == pytest.approx(acc)  # one dataset: same
    corea = data.systems["COREA"]
    gsm, m500, ood = (corea.at_default[k] for k in ("gsm8k", "math500", "ood_math"))
    assert (gsm.pass_at_1, gsm.avg_cost, gsm.relative_cost, gsm.llm_pct) == pytest.approx((0.75, 105, 1.05, 75))
    assert (m500.pass_at_1, m500.avg_cost, m500.relative_cost, m500.llm_pct) == pytest.approx((0.75, 30, 0.3, 0))
    assert (ood.pass_at_1, ood.slm_cost, ood.llm_cost, ood.relative_cost, ood.llm_pct) == pytest.approx(
        (0.75, 30, 37.5, 0.675, 37.5))
    assert "ood_math" not in data.systems["SLM-Verb"].at_default  # its model has no OOD records
    assert data.llm["ood_math"].pass_at_1 == pytest.approx(0.375)
    # the sweep: tau = 0 defers only the missing confidence, tau = 1.1 defers everything
    sweep = {round(p.threshold, 2): p for p in corea.sweeps["deepmath500"]}
    assert (sweep[0.0].pass_at_1, sweep[0.0].avg_cost, sweep[0.0].llm_pct) == pytest.approx((3 / 8, 52.5, 12.5))
    assert (sweep[1.1].pass_at_1, sweep[1.1].relative_cost, sweep[1.1].llm_pct) == pytest.approx((0.75, 140 / 110, 100))
    assert len(corea.sweeps["ood_math"]) == len(data.sweep_taus) == 23


def test_fixed_threshold_and_intervals():
    records = hand_records()
    joined, _ = join_systems(records, RATIO)
    res = evaluate_system("COREA", joined["COREA"], {"deepmath500": 0.5}, np.array([0.5]), n_boot=300)
    p = res.at_default["deepmath500"]
    # tau 0.5: run0 q3 (0.3), q4 (none), run1 q2 (0.2), q4 (0.1) defer: correct 1,1,1,0,1,1,0,1
    assert (p.pass_at_1, p.llm_cost, p.llm_pct) == pytest.approx((6 / 8, 480 / 8, 50))
    assert res.intervals["deepmath500"]["pass_at_1"].low <= 0.75 <= res.intervals["deepmath500"]["pass_at_1"].high
    assert res.intervals["in_domain"]["relative_cost"].value == pytest.approx(90 / 110)


def test_selection_pure_functions():
    taus, acc, cost = [0.0, 0.5, 1.0, 1.1], [0.5, 0.7, 0.78, 0.8], [30, 60, 90, 140]
    assert select_max_drop(taus, acc, cost, 0.8, 0.02) == 1.0
    assert select_max_drop(taus, acc, cost, 0.8, 0.0) == 1.1
    assert select_max_drop(taus, acc, cost, 0.8, 0.5) == 0.0
    assert select_max_drop(taus[:2], acc[:2], cost[:2], 0.8, 0.0) == 0.5  # unreachable: best pass@1
    rel = [0.3, 0.6, 0.9, 1.4]
    assert select_budget(taus, acc, rel, 0.8) == 0.5
    assert select_budget(taus, acc, rel, 0.2) is None
    assert select_budget(taus, acc, rel, 2.0) == 1.1
    assert select_budget([0.0, 0.2, 0.4], [0.6, 0.6, 0.6], [0.5, 0.4, 0.45], 1.0) == 0.2  # tie: cheaper


def test_selection_on_calibration_then_held_out():
    # confidence separates perfectly: 1.0 when right, 0.0 when wrong; the LLM is always right.
    n = 40
    rows = pd.DataFrame({
        "dataset": "gsm8k", "group": "ood_math", "id": [f"g{i}" for i in range(n)], "run": 0,
        "score": [1.0 if i % 3 else 0.0 for i in range(n)], "slm_correct": [bool(i % 3) for i in range(n)],
        "slm_cost": 30.0, "llm_correct": True, "llm_cost": 100.0, "router_cost": 0.0,
    })
    sel = select_thresholds("COREA", rows, [0.0], [0.5], calibration_fraction=0.5, step=0.01, n_boot=200)
    drop, budget = sel
    assert drop.tau == pytest.approx(0.01)  # the cheapest tau that defers exactly the wrong answers
    held = ~calibration_mask(rows, 0.5)
    wrong = (~rows["slm_correct"][held]).mean()
    assert drop.held_out["pass_at_1"].value == pytest.approx(1.0)
    assert drop.held_out["drop"].value == pytest.approx(0.0) and drop.meets_target
    assert drop.held_out["llm_pct"].value == pytest.approx(100 * wrong)
    assert drop.held_out["relative_cost"].value == pytest.approx(0.3 + wrong)
    # never deferring costs 0.3 of the LLM; deferring the wrong third costs ~0.63 > 0.5: tau 0 is the best fit
    assert budget.tau == 0.0 and budget.held_out["relative_cost"].value == pytest.approx(0.3) and budget.meets_target
    infeasible = select_thresholds("COREA", rows, [], [0.2], step=0.01, n_boot=50)[0]
    assert infeasible.tau is None and infeasible.meets_target is None


def test_fast_metrics_equal_corea_metrics():
    rng = np.random.default_rng(0)
    score = np.round(rng.random(500), 1)  # many ties
    score[rng.random(500) < 0.1] = np.nan
    y = rng.random(500) < score.clip(0, 1)
    assert ece_fast(score, y) == pytest.approx(metrics.ece(score, y))
    assert auroc_fast(score, y) == pytest.approx(metrics.auroc(score, y))


def test_cluster_bootstrap_keeps_runs_together():
    question = ["a", "a", "b", "b", "c", "c"]
    clusters = Clusters(question)
    rng = np.random.default_rng(1)
    for _ in range(20):
        idx = clusters.draw(rng)
        picked = [question[i] for i in idx]
        assert len(idx) == 6 and all(picked.count(q) % 2 == 0 for q in set(picked))
    reps = replicates(question, lambda i: np.array([len(i)]), 5, 0)
    assert reps.shape == (5, 1) and (reps == 6).all()


def test_metric_rows_group_macro():
    frame = pd.DataFrame({"dataset": ["a"] * 2 + ["b"] * 4, "group": "ood_math", "id": ["1", "2", "1", "2", "3", "4"],
                          "run": 0, "score": np.nan, "correct": [1, 1, 0, 0, 0, 1]})
    rows = metric_rows(frame.astype({"correct": bool}), "x", ["a", "b"], n_boot=20)
    assert rows[-1].scope == "ood_math" and rows[-1].values["pass_at_1"].value == pytest.approx((1 + 0.25) / 2)


def test_build_report_writes_tables_summary_and_plots(tmp_path):
    out = build_report(hand_records(), tmp_path / "report", size_ratio=RATIO, metrics=MetricsConfig(n_boot=50),
                       selection=SelectionConfig(max_drops=[0.05], cost_budgets=[0.9]))
    summary = json.loads((out / "summary.json").read_text())
    corea = summary["systems"]["COREA"]["in_domain"]
    assert corea["pass_at_1"] == pytest.approx(0.75) and corea["relative_cost"] == pytest.approx(90 / 110)
    assert corea["slm_cost"] == 30 and corea["llm_cost"] == 60 and corea["llm_pct"] == 50
    assert corea["ece"] == pytest.approx(1.45 / 7) and corea["auroc"] == pytest.approx(11 / 12)
    assert summary["systems"]["COREA"]["ood_math"]["relative_cost"] == pytest.approx(0.675)
    assert summary["threshold"] == {"rule": "llm_pass_at_1", "by_dataset": {"deepmath500": 0.75, "gsm8k": 0.75,
                                                                              "math500": 0.0}}
    assert "RLVR-SLM-Probe" not in summary["systems"] and "RLVR-SLM-Probe" in summary["absent_systems"]
    assert summary["systems"]["RLVR-SLM-Verb"]["in_domain"]["ece"] is None  # no confidence at all: null
    report = (out / "report.md").read_text()
    assert "## Table 1" in report and "| COREA | 75.0 | 81.8 | 50.0 |" in report
    assert "Brier-SLM-Verb" in report.split("Systems not shown")[1].splitlines()[0]
    assert "Threshold selection" in report
    for name in ("pareto.png", "threshold.png", "reliability_in_domain.png", "confidence_hist_ood_math.png"):
        assert (out / name).stat().st_size > 10_000
        assert f"]({name})" in report


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("models: {llm: tiny:llm}\ngeneration: {runs: 0}\n")
    with pytest.raises(ConfigError, match=r"generation\.runs"):
        load_eval_config(path)
    path.write_text("models: {slm_verb: tiny:slm}\n")
    with pytest.raises(ConfigError, match=r"models\.llm"):
        load_eval_config(path)
    path.write_text("models: {llm: tiny:llm}\ndatasets: [nope]\n")
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        load_eval_config(path)
    path.write_text("models: {llm: tiny:llm}\nbaselines: {probe: {}}\n")
    with pytest.raises(ConfigError, match="models.rlvr"):
        load_eval_config(path)
    for shipped in ("configs/eval-tiny-cpu.yaml", "configs/eval-paper.yaml"):
        cfg = load_eval_config(shipped, {"generation.runs": "3"})
        assert cfg.generation.runs == 3 and cfg.models.llm is not None


def test_cascade_point_matches_corea_cost():
    joined = join_system(hand_records(), "corea", "confidence", RATIO)
    part = joined[joined["dataset"] == "deepmath500"]
    direct = cascade_point(part["score"].tolist(), part["slm_correct"], part["slm_cost"], part["llm_correct"],
                           part["llm_cost"], 0.75)
    assert direct.pass_at_1 == pytest.approx(0.75) and direct.relative_cost == pytest.approx(90 / 110)


def test_cli_reports_from_saved_records_and_rejects_bad_configs(tmp_path, capsys):
    from corea.cli import main
    from corea.evaluate.records import save_records

    parquet = save_records(hand_records(), tmp_path / "records.parquet")
    rc = main(["eval", "--config", "configs/eval-tiny-cpu.yaml", "--records", str(parquet), "--out", str(tmp_path / "out"),
                    "--set", "cascade.size_ratio=2", "--set", "metrics.n_boot=20", "--set", "selection.enabled=false"])
    assert rc == 0 and "report.md" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    assert summary["systems"]["COREA"]["in_domain"]["relative_cost"] == pytest.approx(90 / 110)
    assert main(["eval", "--config", "configs/eval-tiny-cpu.yaml", "--set", "generation.temperature=-1"]) == 2
    assert "generation.temperature" in capsys.readouterr().err


def test_fast_cascade_values_equal_corea_cost():
    from corea.cost import router_point
    from corea.evaluate.cascade import Arrays, as_vector, fast_values, point

    rng = np.random.default_rng(3)
    n = 200
    frame = pd.DataFrame({"score": np.where(rng.random(n) < 0.1, np.nan, np.round(rng.random(n), 2)),
                          "slm_correct": rng.random(n) < 0.5, "slm_cost": rng.integers(10, 500, n).astype(float),
                          "llm_correct": rng.random(n) < 0.7, "llm_cost": rng.integers(50, 3000, n).astype(float),
                          "router_cost": rng.integers(5, 40, n).astype(float)})
    arrays = Arrays.of(frame)
    for tau in (0.0, 0.25, 0.5, 0.73, 1.0, 1.1):
        for router in (False, True):
            assert fast_values(arrays, tau, router) == pytest.approx(as_vector(point(frame, tau, router)))
    direct = router_point(frame["score"].tolist(), frame["router_cost"], frame["slm_correct"], frame["slm_cost"],
                          frame["llm_correct"], frame["llm_cost"], 0.5)
    assert fast_values(arrays, 0.5, True) == pytest.approx(as_vector(direct))
