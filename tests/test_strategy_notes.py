"""Notes on odd strategy operating points, computed from the per-question rows."""

import pandas as pd

from corea.evaluate.strategy_notes import calibration_sweep, note, notes


def _rows(strategy, split, tau, correct, share, cost, llm_correct, max_drop=0.02):
    return [{"strategy": strategy, "split": split, "threshold": tau, "id": f"q{i}", "correct": c, "llm_share": share,
             "cost": cost, "llm_only_cost": 1.0, "llm_only_correct": lc, "max_drop": max_drop}
            for i, (c, lc) in enumerate(zip(correct, llm_correct))]


LLM = [1, 1, 1, 1, 0]  # LLM-only: 80% on calibration


def test_everything_to_the_llm_because_nothing_else_reached_the_target():
    rows = (_rows("policy", "cal", 0.0, [1, 1, 1, 1, 0], 1.0, 1.3, LLM)
            + _rows("policy", "cal", 0.5, [1, 1, 0, 0, 0], 0.2, 0.5, LLM)
            + _rows("policy", "eval", 0.0, [1, 0, 1, 1, 0], 1.0, 1.25, LLM))
    frame = pd.DataFrame(rows)
    sweep = calibration_sweep(frame, "policy")
    assert list(sweep["threshold"]) == [0.0, 0.5] and list(sweep["pass_at_1"]) == [0.8, 0.4]
    text = note(frame, "policy")
    assert text.startswith("tau 0.00: only thresholds that send everything to the LLM")
    assert "at most 40.0%" in text and "costs 125% of LLM-only" in text


def test_no_threshold_reached_and_ordinary_points_get_no_note():
    rows = (_rows("steer", "cal", 0.5, [0, 0, 0, 1, 0], 1.0, 1.1, LLM)
            + _rows("steer", "eval", 0.5, [0, 0, 0, 1, 0], 1.0, 1.1, LLM)
            + _rows("cascade", "cal", 0.5, [1, 1, 1, 1, 0], 0.4, 0.6, LLM)
            + _rows("cascade", "eval", 0.5, [1, 1, 1, 1, 0], 0.4, 0.6, LLM))
    out = notes(pd.DataFrame(rows))
    assert set(out) == {"steer"} and "no tau came within 2 points" in out["steer"]
    assert "best 20.0% at tau 0.50" in out["steer"]


def test_slm_alone_within_the_target():
    rows = (_rows("cope", "cal", 0.0, [1, 1, 1, 0, 0], 0.0, 0.3, LLM, max_drop=0.25)
            + _rows("cope", "eval", 0.0, [1, 1, 0, 0, 0], 0.0, 0.3, LLM, max_drop=0.25))
    assert "the SLM alone was within 25 points" in note(pd.DataFrame(rows), "cope")


def test_no_threshold_reached_with_work_on_both_tiers():
    rows = (_rows("cope", "cal", 0.0, [0, 0, 0, 1, 0], 0.15, 0.8, LLM)
            + _rows("cope", "cal", 0.5, [0, 0, 0, 0, 0], 0.6, 0.9, LLM)
            + _rows("cope", "eval", 0.0, [0, 0, 1, 0, 0], 0.15, 0.8, LLM))
    text = note(pd.DataFrame(rows), "cope")
    assert text == ("tau 0.00: no tau came within 2 points of LLM-only's calibration pass@1 (80.0%; best 20.0% at "
                    "tau 0.00), so the most accurate tau was taken (LLM share 15%).")
