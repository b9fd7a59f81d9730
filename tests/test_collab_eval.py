"""Online evaluation of the strategies on tiny random checkpoints (cheap settings), and their report rows."""

import json

import pandas as pd
import pytest

from corea.data import Record
from corea.evaluate.config import EvalConfig
from corea.evaluate.online import STRATEGY_RECORDS_FILE, evaluate_strategies, split_questions
from corea.models import make_tiny_checkpoint
from support import record_rows as _rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collab-eval")
    paths = {"corea": str(make_tiny_checkpoint(tmp / "slm", "slm")), "llm": str(make_tiny_checkpoint(tmp / "llm", "llm"))}
    cfg = EvalConfig.model_validate({
        "output_dir": str(tmp / "out"), "models": {"corea": {"path": paths["corea"]}, "llm": {"path": paths["llm"]}},
        "generation": {"runs": 1, "temperature": 0.0, "max_tokens": 10},
        "engine": {"options": {"device": "cpu"}},
        "strategies": {"sweep_step": 0.55, "max_steps": 2, "max_step_tokens": 5, "policy_iterations": 1,
                       "train_fraction": 0.25, "calibration_fraction": 0.4},
    })
    questions = [Record(id=f"q{i}", question=f"What is {i} + {i + 1}?", gold=str(2 * i + 1), kind="math",
                        dataset="gsm8k") for i in range(16)]
    frame = evaluate_strategies(cfg, paths, questions)
    return cfg, questions, frame


def test_rows_hold_every_strategy_threshold_and_call(run):
    cfg, questions, frame = run
    split = split_questions(questions, cfg.seed, 0.25, 0.4)
    assert set(frame["strategy"]) == {"cascade", "steer", "stepwise_policy", "cope"}
    for name, g in frame.groupby("strategy"):
        cal, held = g[g["split"] == "cal"], g[g["split"] == "eval"]
        assert sorted(cal["threshold"].unique()) == [0.0, 0.55, 1.1]
        assert len(cal) == 3 * len(split["cal"]) and len(held) == len(split["eval"])
        assert held["threshold"].nunique() == 1
    steer = frame[(frame["strategy"] == "steer") & (frame["split"] == "cal")]
    assert (steer.loc[steer["threshold"] == 1.1, "llm_share"] == 1).all()  # every step handed to the LLM
    assert (steer.loc[steer["threshold"] == 0.0, "llm_share"] == 0).all()
    for calls in steer.loc[steer["threshold"] == 1.1, "calls"]:
        tiers = [(c["tier"], c["accepted"]) for c in json.loads(calls)]
        assert tiers[:2] == [("slm", False), ("llm", True)]
    assert (frame["cost"] > 0).all() and (frame["cost_cached"] <= frame["cost"] + 1e-9).all()
    assert (frame["llm_only_cost"] > 0).all()


def test_report_shows_the_strategies(run, tmp_path):
    from corea.evaluate.run import report_from_config

    cfg, _, frame = run
    cfg = cfg.model_copy(update={"output_dir": str(tmp_path)})
    frame.to_parquet(tmp_path / STRATEGY_RECORDS_FILE, index=False)
    table = {(f"q{i}", 0): (0.9 if i % 2 else 0.2, i % 2) for i in range(8)}
    records = pd.DataFrame(_rows("corea", "gsm8k", table) + _rows("llm", "gsm8k", {k: (None, 1) for k in table}, output=10))
    report = report_from_config(records, cfg, tmp_path / "report")
    md = (report / "report.md").read_text()
    assert "collaboration strategies" in md
    for name in ("STEER", "Stepwise policy", "COPE", "COREA (online)"):
        assert f"| {name} |" in md
    summary = json.loads((report / "summary.json").read_text())
    rows = {r["strategy"]: r for r in summary["strategies"]}
    held = frame[(frame["strategy"] == "steer") & (frame["split"] == "eval")]
    assert rows["steer"]["pass_at_1"] == pytest.approx(held["correct"].mean())
    assert rows["steer"]["cost_rel"] == pytest.approx(held["cost"].mean() / held["llm_only_cost"].mean())
    assert rows["steer"]["pass_at_1_low"] <= rows["steer"]["pass_at_1"] <= rows["steer"]["pass_at_1_high"]
    assert (report / "strategies_pareto.png").stat().st_size > 0 and (report / "llm_call_positions.png").exists()
    assert "Table 1: pass@1" in md  # the cascade tables are still there


def test_what_is_fitted_is_written_for_serving(run):
    """The mixture, the policy and every chosen tau land in output_dir/strategies, as a serve config reads them."""
    from corea.evaluate.online import STRATEGY_DIR, serve_settings
    from corea.serve.config import load_serve_config

    cfg, _, frame = run
    section = serve_settings(cfg.out_dir / STRATEGY_DIR)
    held = frame[frame["split"] == "eval"].groupby("strategy")["threshold"].first()
    assert section["thresholds"] == {k: float(held[k]) for k in ("steer", "stepwise_policy", "cope")}
    serve = load_serve_config({"name": "c", "slm": {"model": "tiny:slm"}, "llm": {"model": "tiny:llm"},
                               "strategies": section})
    assert serve.strategies.policy_path and serve.strategies.mixture_path and serve.strategies.max_step_tokens == 5
