"""Evaluation end to end on tiny checkpoints and the shipped fixtures, plus the generation pieces one by one.

Tiny random models are rarely right and rarely state a confidence: these tests check the plumbing, and that
every number of summary.json follows from records.parquet; the hand-made records test the numbers themselves.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from corea import metrics
from corea.cost import token_cost
from corea.data import load_dataset
from corea.evaluate.baselines import parse_router_prob, router_prompt, router_targets, format_probability
from corea.evaluate.config import load_eval_config
from corea.evaluate.generate import (
    GenerateBatch,
    GenerationJob,
    expand_runs,
    grade_batch,
    question_rows,
    sampled_logprobs,
    vllm_postprocess,
    vllm_preprocess,
)
from corea.evaluate.records import COLUMNS

RATIO = 32 / 7


# ------------------------------------------------------------------------------------- fast pieces
def test_router_prompt_and_parsing():
    record = load_dataset("commonsenseqa", limit=1)[0]
    prompt = router_prompt(record)
    assert prompt.startswith(f"Question: {record.question.strip()}\nAnswer Choices:\n(A) ")
    assert prompt.endswith(" Instruction: Estimate and output the probability (0.0-1.0) that a small language "
                           "model (10B) can answer the question correctly.")
    assert parse_router_prob("0.625") == 0.625
    assert parse_router_prob("The probability is 0.3, maybe 0.9") == 0.3
    assert parse_router_prob("1.5") is None and parse_router_prob("no idea") is None
    frame = pd.DataFrame({"dataset": "d", "id": ["a"] * 8 + ["b"] * 8, "correct": [True] * 5 + [False] * 11})
    targets = router_targets(frame)
    assert [format_probability(p) for p in targets] == ["0.625", "0.000"]


def test_generate_and_grade_batches_without_ray(tiny_checkpoints):
    records = load_dataset("gsm8k", limit=2)
    job = GenerationJob(role="corea", model_path=str(tiny_checkpoints["slm"]), runs=3, max_tokens=8)
    rows = pd.DataFrame(question_rows(records, "corea", seed=0))
    out = GenerateBatch(job)(rows)
    assert len(out) == 6 and list(out["run"]) == [0, 1, 2] * 2
    assert (out["prompt_tokens"] > 0).all() and out["output_tokens"].between(1, 8).all()
    again = GenerateBatch(job)(rows.iloc[::-1])  # per-question seeds: the same samples whatever the batch
    assert sorted(again["response"]) == sorted(out["response"])
    graded = grade_batch(out.assign(response=["\\boxed{18} \\confidence{0.7}", "\\boxed{3}", "x"] * 2))
    assert graded["correct"].tolist()[:3] == [records[0].gold == "18", records[0].gold == "3", False]
    assert graded["confidence"].iloc[0] == 0.7 and math.isnan(graded["confidence"].iloc[1])
    routed = grade_batch(out.assign(response="0.8"), style="router")
    assert (routed["confidence"] == 0.8).all() and not routed["correct"].any()


def test_vllm_row_functions():
    row = question_rows(load_dataset("gsm8k", limit=1), "corea", seed=0)[0]
    expanded = expand_runs(row, 3)
    assert [r["run"] for r in expanded] == [0, 1, 2] and len({r["seed"] for r in expanded}) == 3
    pre = vllm_preprocess(expanded[1], temperature=0.6, top_p=1.0, max_tokens=32)
    assert pre["messages"][0]["role"] == "user" and pre["sampling_params"]["logprobs"] == 0
    assert pre["sampling_params"]["seed"] == expanded[1]["seed"]
    out = {**pre, "generated_text": "\\boxed{1}", "generated_tokens": [5, 7], "num_input_tokens": 40,
           "num_generated_tokens": 2,
           "logprobs": [{5: {"logprob": math.log(0.5), "rank": 1, "decoded_token": "a"}},
                        {"7": {"logprob": math.log(0.25), "rank": 2, "decoded_token": "b"}}]}
    post = vllm_postprocess(out, role="llm", model_path="/m", max_tokens=32)
    assert post["run"] == 1 and post["prompt_tokens"] == 40 and post["output_tokens"] == 2
    assert post["mean_token_prob"] == pytest.approx(0.375) and post["response"] == "\\boxed{1}"
    assert post["finish_reason"] == "stop"
    assert vllm_postprocess(out, role="llm", model_path="/m", max_tokens=2)["finish_reason"] == "length"
    with pytest.raises(ValueError, match="no 'logprobs'"):  # a missing column is an error, never 0.0
        vllm_postprocess({**out, "logprobs": None}, role="llm", model_path="/m", max_tokens=32)
    with pytest.raises(ValueError, match="2 generated tokens"):
        sampled_logprobs(out["logprobs"][:1], [5, 7])
    assert sampled_logprobs(None, []) == []


def test_vllm_backend_is_gated():
    from corea.evaluate.generate import vllm_available, vllm_processor

    if vllm_available():
        pytest.skip("vLLM is installed here")
    with pytest.raises(RuntimeError, match="models.llm: backend 'vllm' needs vLLM"):
        vllm_processor(GenerationJob(role="llm", model_path="/m", backend="vllm"))


# -------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def _recompute(records: pd.DataFrame, system: dict, tau_by_dataset: dict) -> dict[str, dict]:
    """Per dataset: the cascade at the dataset's tau, computed here from the records alone."""
    slm = records[records["model"] == system["slm"]].set_index(["dataset", "id", "run"])
    llm = records[records["model"] == "llm"].set_index(["dataset", "id", "run"])
    out = {}
    for dataset, tau in tau_by_dataset.items():
        s, l = slm.loc[dataset], llm.loc[dataset].loc[slm.loc[dataset].index]
        c_slm = token_cost(s["prompt_tokens"], s["output_tokens"])
        c_llm = token_cost(l["prompt_tokens"], l["output_tokens"], RATIO)
        if system.get("router"):
            r = records[(records["model"] == "router") & (records["dataset"] == dataset)].set_index(["id", "run"])
            score = r.loc[s.index, "confidence"].to_numpy()
            defer = np.isnan(score) | (score < tau)
            slm_side = token_cost(r.loc[s.index, "prompt_tokens"], r.loc[s.index, "output_tokens"]) + np.where(defer, 0, c_slm)
        else:
            score = s[system["score"]].to_numpy()
            defer = np.isnan(score) | (score < tau)
            slm_side = c_slm
        correct = np.where(defer, l["correct"], s["correct"])
        slm_cost, llm_cost = float(np.mean(slm_side)), float(np.mean(np.where(defer, c_llm, 0)))
        y = s["correct"].to_numpy(bool)
        out[dataset] = {"pass_at_1": correct.mean(), "slm_cost": slm_cost, "llm_cost": llm_cost,
                        "avg_cost": slm_cost + llm_cost, "relative_cost": (slm_cost + llm_cost) / np.mean(c_llm),
                        "llm_pct": 100 * defer.mean(), "ece": metrics.ece(score, y), "auroc": metrics.auroc(score, y)}
    return out


SYSTEMS = {
    "SLM-Verb": {"slm": "slm_verb", "score": "confidence"},
    "RLVR-SLM-Verb": {"slm": "rlvr", "score": "confidence"},
    "RLVR-SLM-AvgProb": {"slm": "rlvr", "score": "mean_token_prob"},
    "RLVR-SLM-Probe": {"slm": "rlvr", "score": "probe_confidence"},
    "Router + RLVR-SLM": {"slm": "rlvr", "router": True},
    "COREA": {"slm": "corea", "score": "confidence"},
}


@pytest.fixture(scope="module")
def tiny_run(local_ray, tmp_path_factory):
    """One full evaluation: 5 tiny models (Brier left out), 6 datasets x 6 questions, 2 runs, probe and router."""
    from corea.evaluate import evaluate

    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = load_eval_config("configs/eval-tiny-cpu.yaml", {
        "output_dir": str(out), "models.brier": "null", "progress": "false", "metrics.n_boot": "50",
        "baselines.train_questions.limit": "8", "baselines.train_questions.samples": "4",
        "baselines.probe.epochs": "2",
    })
    report = evaluate(cfg)
    return out, report, pd.read_parquet(out / "records.parquet"), json.loads((report / "summary.json").read_text())


@pytest.mark.slow
def test_records(tiny_run):
    out, _, records, _ = tiny_run
    assert set(COLUMNS) <= set(records.columns)
    assert set(records["model"]) == {"slm_verb", "rlvr", "corea", "llm", "router"}
    assert set(records["dataset"]) == {"deepmath500", "math500", "gsm8k", "olympiadbench", "gpqa", "commonsenseqa"}
    assert set(records["group"]) == {"in_domain", "ood_math", "ood_nonmath"}
    assert (records.groupby("model").size() == 6 * 6 * 2).all()
    assert records.groupby(["model", "dataset", "id"])["run"].apply(lambda runs: sorted(runs) == [0, 1]).all()
    assert (records["prompt_tokens"] > 0).all() and records["output_tokens"].between(1, 16).all()
    assert records.loc[records["model"] == "router", "output_tokens"].max() <= 8
    assert records["mean_token_prob"].between(0, 1).all()
    probe = records.loc[records["model"] == "rlvr", "probe_confidence"]
    assert probe.notna().all() and probe.between(0, 1).all()
    assert records.loc[records["model"] != "rlvr", "probe_confidence"].isna().all()
    baselines = json.loads((out / "baselines" / "baselines.json").read_text())
    assert baselines["train_questions"] == 8 and baselines["probe"]["input_dim"] == 64
    assert [h["epoch"] for h in baselines["probe"]["history"]] == [1, 2]  # each epoch's losses, from rank 0
    assert (out / "baselines" / "router" / "config.json").exists()


@pytest.mark.slow
def test_summary_recomputed_from_records(tiny_run):
    _, _, records, summary = tiny_run
    assert summary["absent_systems"] == ["Brier-SLM-Verb"]
    taus = summary["threshold"]["by_dataset"]
    for dataset, tau in taus.items():
        llm = records[(records["model"] == "llm") & (records["dataset"] == dataset)]
        assert tau == pytest.approx(llm["correct"].mean())
    groups = summary["groups"]
    assert groups == {"in_domain": ["deepmath500"], "ood_math": ["math500", "gsm8k", "olympiadbench"],
                      "ood_nonmath": ["gpqa", "commonsenseqa"]}
    for name, system in SYSTEMS.items():
        per_dataset = _recompute(records, system, taus)
        for dataset, expected in per_dataset.items():
            got = summary["datasets"][name][dataset]
            for key, value in expected.items():
                assert got[key] == (None if np.isnan(value) else pytest.approx(value)), (name, dataset, key)
        for group, members in groups.items():
            got = summary["systems"][name][group]
            for key in ("pass_at_1", "avg_cost", "slm_cost", "llm_cost", "relative_cost", "llm_pct", "ece", "auroc"):
                values = [per_dataset[d][key] for d in members if not np.isnan(per_dataset[d][key])]
                assert got[key] == (pytest.approx(np.mean(values)) if values else None), (name, group, key)


@pytest.mark.slow
def test_report_and_plots(tiny_run):
    _, report, _, summary = tiny_run
    text = (report / "report.md").read_text()
    assert "## Table 1" in text and "| COREA |" in text and "Brier-SLM-Verb" in text
    for group in summary["groups"]:
        assert f"reliability_{group}.png" in text and (report / f"reliability_{group}.png").exists()
    for name in ("pareto.png", "threshold.png", "confidence_hist_in_domain.png"):
        assert (report / name).stat().st_size > 10_000


@pytest.mark.slow
def test_ray_job_entry_point_reports_from_saved_records(tiny_run, tmp_path):
    run, _, _, summary = tiny_run
    out = tmp_path / "again"
    proc = subprocess.run(
        [sys.executable, "ray_jobs/evaluate.py", "--config", "configs/eval-tiny-cpu.yaml", "--out", str(out),
         "--set", "metrics.n_boot=50", "--set", "selection.enabled=false", "--records", str(run / "records.parquet")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((out / "report" / "summary.json").read_text())
    assert again["systems"]["COREA"]["in_domain"]["pass_at_1"] == summary["systems"]["COREA"]["in_domain"]["pass_at_1"]
    assert again["threshold_selection"] == [] and not (out / "generations").exists()


@pytest.mark.slow
def test_vllm_processor_builds_with_ray_data_llm(local_ray, monkeypatch):
    """The ray.data.llm processor is built from our config and row functions (running it needs vLLM + a GPU)."""
    import corea.evaluate.generate as generate

    monkeypatch.setattr(generate, "vllm_available", lambda: True)
    job = GenerationJob(role="llm", model_path="/models/llm", backend="vllm", concurrency=2, batch_size=16,
                        options={"tensor_parallel_size": 2, "dtype": "bfloat16"})
    processor = generate.vllm_processor(job)
    assert type(processor).__name__ == "Processor"
