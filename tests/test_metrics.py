import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from corea import metrics


def test_pass_at_1_and_ratio():
    assert metrics.pass_at_1([1, 0, 1, 1]) == 0.75
    assert metrics.confidence_output_ratio([0.1, None, float("nan"), 0.9]) == 0.5
    with pytest.raises(ValueError):
        metrics.pass_at_1([])


def test_ece_hand_computed():
    # bins: 0.95 -> bin 9 (two items, 1 correct): |0.5 - 0.95| * 2/4
    #       0.15 -> bin 1 (two items, 0 correct): |0 - 0.15| * 2/4
    conf = [0.95, 0.95, 0.15, 0.15]
    y = [1, 0, 0, 0]
    assert metrics.ece(conf, y) == pytest.approx(0.5 * 0.45 + 0.5 * 0.15)


def test_ece_perfect_and_edges():
    assert metrics.ece([1.0, 1.0, 0.0], [1, 1, 0]) == pytest.approx(0.0)  # 1.0 falls in the last bin
    assert math.isnan(metrics.ece([None, None], [1, 0]))
    # missing confidences are ignored, not counted as zero
    assert metrics.ece([1.0, None], [1, 0]) == pytest.approx(0.0)


def test_reliability_bins():
    bins = metrics.reliability_bins([0.05, 0.12, 0.18, 0.99], [0, 1, 0, 1], n_bins=10)
    assert [b.count for b in bins] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
    assert bins[1].accuracy == 0.5 and bins[1].confidence == pytest.approx(0.15)
    assert math.isnan(bins[2].accuracy)


def test_auroc_hand_computed_with_ties():
    # positives {0.8, 0.5}, negatives {0.5, 0.2}: pairs (0.8>0.5)=1, (0.8>0.2)=1, (0.5=0.5)=0.5, (0.5>0.2)=1
    conf, y = [0.8, 0.5, 0.5, 0.2], [1, 1, 0, 0]
    assert metrics.auroc(conf, y) == pytest.approx(3.5 / 4)
    assert metrics.auroc(conf, y) == pytest.approx(roc_auc_score(y, conf))
    assert metrics.auroc([0.5, 0.5, 0.5], [1, 0, 1]) == pytest.approx(0.5)
    assert math.isnan(metrics.auroc([0.2, 0.9], [1, 1]))


def test_auroc_matches_sklearn_random():
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 11, 300) / 10  # many ties
    y = rng.random(300) < conf
    assert metrics.auroc(conf, y) == pytest.approx(roc_auc_score(y, conf))


def test_bootstrap_intervals_cover_point():
    rng = np.random.default_rng(1)
    conf = rng.random(400)
    y = rng.random(400) < conf
    for interval in (
        metrics.pass_at_1_ci(y, n_boot=200),
        metrics.ece_ci(conf, y, n_boot=200),
        metrics.auroc_ci(conf, y, n_boot=200),
    ):
        assert interval.low <= interval.value <= interval.high
        assert interval.high - interval.low < 0.2
    ratio = metrics.confidence_output_ratio_ci([0.5, None] * 50, n_boot=200)
    assert ratio.value == 0.5 and ratio.low < 0.5 < ratio.high
    # a constant metric has a zero-width interval; same seed, same interval
    a = metrics.pass_at_1_ci([1, 1, 1], n_boot=50, seed=3)
    assert (a.low, a.high) == (1.0, 1.0)
    assert metrics.auroc_ci(conf, y, n_boot=50, seed=7) == metrics.auroc_ci(conf, y, n_boot=50, seed=7)


def test_length_mismatch():
    with pytest.raises(ValueError):
        metrics.ece([0.5], [1, 0])


def test_brier_matches_sklearn():
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(2)
    conf = rng.random(200)
    y = rng.random(200) < conf
    assert metrics.brier(conf, y) == pytest.approx(brier_score_loss(y, conf))
    with_missing = np.r_[conf, [np.nan, np.nan]]
    assert metrics.brier(with_missing, np.r_[y, [True, False]]) == pytest.approx(brier_score_loss(y, conf))
    assert metrics.brier([1.0, 0.0], [1, 0]) == 0.0 and math.isnan(metrics.brier([None], [1]))


def test_aurc_hand_computed():
    # sorted by confidence: 0.9 right, 0.8 wrong, 0.7 right, 0.6 wrong
    # risk(k) = 0/1, 1/2, 1/3, 2/4 -> AURC = (0 + 1/2 + 1/3 + 1/2) / 4 = 1/3
    conf, y = [0.7, 0.9, 0.6, 0.8], [1, 1, 0, 0]
    coverage, risk = metrics.risk_coverage(conf, y)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0.0, 0.5, 1 / 3, 0.5])
    assert metrics.aurc(conf, y) == pytest.approx(1 / 3)
    # a perfect ranking: errors last -> risk 0, 0, 1/3 -> AURC 1/9; a missing confidence ranks last
    assert metrics.aurc([0.9, 0.8, 0.1], [1, 1, 0]) == pytest.approx(1 / 9)
    assert metrics.aurc([0.9, 0.8, None], [1, 1, 0]) == pytest.approx(1 / 9)
    assert metrics.aurc([None, 0.8, 0.9], [0, 1, 1]) == pytest.approx(1 / 9)


def test_aurc_ties_are_the_expectation_over_orders():
    # one tie block of 2 (one right, one wrong) then a wrong: risk(1) = E[wrong of a random first] = 1/2,
    # risk(2) = 1/2, risk(3) = 2/3
    conf, y = [0.5, 0.5, 0.1], [1, 0, 0]
    assert metrics.risk_coverage(conf, y)[1].tolist() == pytest.approx([0.5, 0.5, 2 / 3])
    assert metrics.aurc(conf, y) == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert metrics.aurc(conf, y) == metrics.aurc([0.5, 0.5, 0.1], [0, 1, 0])  # order of the rows is irrelevant


def test_selective_accuracy_at_coverage():
    conf = [0.95, 0.9, 0.85, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    y = [1, 1, 1, 0, 1, 1, 0, 0, 1, 0]
    assert metrics.selective_accuracy(conf, y, 0.5) == pytest.approx(4 / 5)  # top 5: 1 1 1 0 1
    assert metrics.selective_accuracy(conf, y, 0.8) == pytest.approx(5 / 8)
    assert metrics.selective_accuracy(conf, y, 1.0) == pytest.approx(metrics.pass_at_1(y))
    assert metrics.selective_accuracy(conf, y, 0.01) == 1.0  # at least one response
    with pytest.raises(ValueError):
        metrics.selective_accuracy(conf, y, 0.0)


def test_report_tables_summary_and_plot_carry_the_selective_metrics(tmp_path):
    from test_evaluate_tables import RATIO, hand_records  # the hand-built records of the report tests

    from corea.evaluate.config import MetricsConfig
    from corea.evaluate.report import build_report
    from corea.evaluate.tables import metric_vector

    score = np.array([0.9, 0.8, np.nan, 0.4])
    y = np.array([True, False, True, False])
    vector = metric_vector(score, y)
    assert vector[4:].tolist() == pytest.approx([metrics.brier(score, y), metrics.aurc(score, y),
                                                 metrics.selective_accuracy(score, y, 0.5),
                                                 metrics.selective_accuracy(score, y, 0.8)])
    out = build_report(hand_records(), tmp_path / "report", size_ratio=RATIO, metrics=MetricsConfig(n_boot=20))
    summary = json.loads((out / "summary.json").read_text())
    corea = summary["systems"]["COREA"]["in_domain"]
    assert {"brier", "aurc", "selective_accuracy_50", "selective_accuracy_80"} <= set(corea)
    assert 0 <= corea["brier"] <= 1 and 0 <= corea["aurc"] <= 1 and corea["aurc_ci"][0] <= corea["aurc"]
    report = (out / "report.md").read_text()
    assert "| Brier (%) | AURC (%) | Sel@50 (%) | Sel@80 (%) |" in report
    assert (out / "risk_coverage_in_domain.png").stat().st_size > 10_000 and "](risk_coverage_in_domain.png)" in report


def test_training_step_metrics_carry_the_selective_metrics():
    from corea.train.loop import step_metrics

    rewards = [[{"confidence": c, "correctness": y, "total": 0.0, "format": 1.0, "confidence_reward": 0.0}
                for c, y in ((0.9, 1.0), (0.2, 0.0), (None, 1.0), (0.6, 0.0))]]
    rollouts = [{"samples": [{"token_ids": [1, 2], "finish_reason": "stop"}] * 4}]
    out = step_metrics(rewards, rollouts)
    conf, y = [0.9, 0.2, None, 0.6], [True, False, True, False]
    assert out["brier"] == pytest.approx(metrics.brier(conf, y)) and out["aurc"] == pytest.approx(metrics.aurc(conf, y))
    assert out["selective_accuracy@50"] == pytest.approx(0.5) and out["selective_accuracy@80"] == pytest.approx(2 / 4)
