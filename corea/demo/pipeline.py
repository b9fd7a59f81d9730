"""``corea demo``: the paper's Table 1 in miniature, end to end on a local Ray cluster with tiny checkpoints.

1. side by side (Ray Train + DeepSpeed): a tiny SLM is warm-started on the sums task and its two out-of-domain
   variants (differences; lettered choices), overconfident; an LLM stand-in (the larger tiny size) is
   fine-tuned on the evaluation questions: it knows what the SLM does not, as a larger model would (no tiny
   model can be made truly stronger in minutes). The LLM stand-in's SFT, the longest job, goes on through
   stages 2 and 3 until its checkpoint is needed, so that both cores stay busy;
2. three SLMs are trained with GRPO on Ray actors from the same warm start, on sums only: COREA (L1
   confidence reward), RLVR (no confidence reward) and Brier;
3. evaluation with Ray Data of the paper's seven systems (SLM-Verb, RLVR-SLM-Verb, RLVR-SLM-AvgProb,
   RLVR-SLM-Probe, Router + RLVR-SLM, Brier-SLM-Verb, COREA) and LLM-only on three dataset groups (in-domain
   sums, OOD math differences, OOD non-math choices), with the probe and the router trained on the RLVR SLM's
   samples of the RL questions (the SLMs' side runs while the LLM stand-in finishes); the collaboration
   strategies (COREA's cascade online, STEER, the stepwise policy, COPE) online on the COREA SLM and the LLM;
   the report with Tables 1 and 2, plots and what the figures show;
4. the four strategies served over HTTP (Ray Serve, OpenAI-compatible; STEER's mixture, the stepwise policy and
   every threshold as stage 3 fitted and calibrated them), with a sample request to each.

``DemoSize`` sets how much work each stage does: ``FULL`` (the default, 14 minutes on 2 cores) and
``QUICK`` (``--quick``, a few minutes: every stage and every system on small subsets, for the test suite).
"""

from __future__ import annotations

import json
import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import ray

from corea.data import Record, register_dataset
from corea.demo.task import build_ood_splits, build_splits, sft_examples
from corea.demo.verdict import verdict
from corea.models import make_tiny_checkpoint
from corea.train.sft import SFTConfig, sft

log = logging.getLogger(__name__)
DATASET = "demo-sums"
#: The evaluation datasets: registered name -> (records attribute, dataset group).
EVAL_SETS = {DATASET: "in_domain", "demo-differences": "ood_math", "demo-sum-choice": "ood_nonmath"}
#: The RL runs from the same warm start: evaluation role -> (confidence reward, label).
RL_RUNS = {"corea": ("l1", "COREA (L1)"), "rlvr": ("none", "RLVR"), "brier": ("brier", "Brier")}
#: The largest pass@1 drop against the LLM that threshold selection allows (calibration split).
MAX_PASS_DROP = 0.05
STAGES = 4


@dataclass(frozen=True)
class DemoSize:
    """How much work each stage does."""

    sft_repeats: int = 120  # passes over the warm-start sums
    ood_repeats: int = 40  # passes over the warm-start differences and choices
    llm_repeats: int = 70  # passes of the LLM stand-in over the evaluation questions, lr decaying linearly to 0
    rl_steps: int = 80  # GRPO steps of each RL run
    runs: int = 2  # evaluation samples per question
    eval_limit: int | None = None  # questions per evaluation dataset (None: all)
    train_questions: int | None = None  # RL questions the RLVR SLM samples for the probe and the router
    router_epochs: int = 30
    n_boot: int = 200
    strategy_sweep_step: float = 0.25  # threshold grid of the online strategies (STEER, stepwise policy, COPE)
    policy_iterations: int = 3  # REINFORCE passes of the stepwise policy


FULL = DemoSize()
QUICK = DemoSize(sft_repeats=8, ood_repeats=4, llm_repeats=8, rl_steps=2, runs=1, eval_limit=10, train_questions=12,
                 router_epochs=1, n_boot=20,
                 strategy_sweep_step=0.5, policy_iterations=1)


def _step(n: int, text: str, start: float) -> None:
    print(f"\n[{n}/{STAGES}] {text}  (t = {time.perf_counter() - start:.0f} s)", flush=True)


def train_config(policy: str, out: Path, steps: int, seed: int, role: str = "corea"):
    """One RL run. lr 6e-4: COREA's AUROC on its rollouts passes 0.8 by step 50 and keeps taught sums at 97%
    (at 3e-4 the AUROC stays ~0.5 for 80 steps; at 1e-3 taught sums fall to 80%; at 3e-3 every answer collapses)."""
    from corea.train.config import TrainConfig

    return TrainConfig.model_validate({
        "name": f"demo-{role}", "seed": seed,
        "model": {"policy": policy},
        "data": {"dataset": f"{DATASET}-rl", "split": None},
        "reward": {"confidence_reward": RL_RUNS[role][0]},
        "rollout": {"n": 8, "prompts_per_step": 16, "temperature": 1.0, "max_tokens": 16},
        "optim": {"steps": steps, "train_batch_prompts": 16, "micro_batch_size": 32, "lr": 6e-4,
                  "kl_coef": 0.001, "zero_stage": 1},
        "resources": {"rollout_cpus": 0.5, "reward_cpus": 0.25, "trainer_cpus": 0.5, "reference_cpus": 0.25},
        "output": {"dir": str(out / role), "checkpoint_every": steps, "keep_checkpoints": 1},
    })


def eval_config(paths: dict[str, str], out: Path, seed: int, size: DemoSize = FULL):
    """The seven systems and LLM-only on the three groups; probe and router from the RLVR SLM's samples."""
    from corea.evaluate.config import EvalConfig

    baselines = {}
    if "rlvr" in paths:
        baselines = {
            "train_questions": {"dataset": f"{DATASET}-rl-questions", "split": None, "limit": size.train_questions,
                                "samples": 8, "temperature": 0.6},
            "probe": {"epochs": 10, "batch_size": 64, "feature_batch_size": 32, "max_length": 128},
            "router": {"sft": {"epochs": size.router_epochs, "batch_size": 32, "lr": 3e-3, "seed": seed},
                       "max_tokens": 8},
        }
    return EvalConfig.model_validate({
        "name": "demo", "seed": seed, "output_dir": str(out / "eval"),
        "models": {role: {"path": path} for role, path in paths.items()},
        "datasets": [{"name": name, "limit": size.eval_limit} for name in EVAL_SETS],
        "generation": {"runs": size.runs, "temperature": 0.6, "max_tokens": 16},
        "engine": {"backend": "transformers", "options": {"device": "cpu", "max_batch_size": 32},
                   "concurrency": 1, "batch_size": 32, "num_cpus": 1, "grade_concurrency": 1, "grade_cpus": 0.5},
        "selection": {"calibration_fraction": 0.5, "max_drops": [MAX_PASS_DROP], "cost_budgets": [0.8]},
        "metrics": {"n_boot": size.n_boot},
        "baselines": baselines,
        # The collaboration strategies beside the cascade, online on the COREA SLM and the LLM (an answer here
        # is one step, so a step-level strategy hands over at most the answer step or the plan).
        "strategies": {"slm": "corea", "max_steps": 2, "max_step_tokens": 16, "sweep_step": size.strategy_sweep_step,
                       "policy_iterations": size.policy_iterations, "max_drop": MAX_PASS_DROP}
        if "corea" in paths else None,
    })


def register_demo_datasets(seed: int) -> tuple[list[Record], list[Record], list[Record]]:
    """Register the RL prompts, the RL questions (each once, for the probe and the router) and the three
    evaluation sets (each shuffled with ``seed``, so that a ``limit`` keeps both sides of the skill boundary);
    returns the warm-start sums, the warm-start OOD records and the evaluation records."""
    sums, ood = build_splits(seed), build_ood_splits(seed)
    register_dataset(f"{DATASET}-rl", loader=lambda _p: sums.rl_prompts(), path=".", overwrite=True)
    register_dataset(f"{DATASET}-rl-questions", loader=lambda _p: sums.rl, path=".", overwrite=True)
    evaluation = []
    for name, records in zip(EVAL_SETS, (sums.eval, ood.math, ood.choice)):
        records = list(records)
        random.Random(f"{seed}-{name}").shuffle(records)
        register_dataset(name, loader=lambda _p, rs=records: rs, path=".", group=EVAL_SETS[name],
                         kind=records[0].kind, overwrite=True)
        evaluation += records
    return sums.sft, ood.sft, evaluation


#: Served model ids of the step-level and plan-based strategies (``corea-cascade`` is the cascade).
STRATEGY_MODEL_IDS = {"corea-steer": "steer", "corea-stepwise-policy": "stepwise_policy", "corea-cope": "cope"}


def serve_collaboration(slm: str, llm: str, out: Path, port: int, threshold: float, strategies: Path | None) -> str:
    """Deploy the cascade and, from stage 3's ``strategies`` folder (calibrated thresholds, STEER's mixture, the
    stepwise policy), the three other strategies under ``STRATEGY_MODEL_IDS``; one replica per tier, CPU
    fractions that fit 2 cores. Returns the base URL."""
    from corea.evaluate.online import serve_settings
    from corea.serve.app import deploy
    from corea.serve.config import load_serve_config

    tier = {"resources": {"num_cpus": 0.5}, "torch_threads": 1,
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8}}
    section = {}
    if strategies is not None and (strategies / "strategies.json").exists():
        section = {**serve_settings(strategies), "model_ids": STRATEGY_MODEL_IDS}
    cfg = load_serve_config({
        "name": "corea", "work_dir": str(out / "serve"), "http": {"host": "127.0.0.1", "port": port},
        "cascade": {"threshold": threshold}, "ingress": {"resources": {"num_cpus": 0.25}},
        "slm": {"model": slm, **tier}, "llm": {"model": llm, **tier}, **({"strategies": section} if section else {}),
    })
    return deploy(cfg)[cfg.name]


def sample_requests(url: str, models: list[str]) -> dict[str, dict]:
    """'What is 3 + 4?' to each served model id; model id -> response body."""
    import httpx

    out = {}
    for model in models:
        body = {"model": model, "messages": [{"role": "user", "content": "What is 3 + 4?"}], "max_tokens": 16}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        response.raise_for_status()
        out[model] = response.json()
    return out


def httpx_get_models(url: str) -> list[dict]:
    import httpx

    response = httpx.get(f"{url}/v1/models", timeout=30)
    response.raise_for_status()
    return response.json()["data"]


def _steps_done(folder: Path) -> int:
    from corea.train.loop import METRICS_FILE

    path = folder / METRICS_FILE
    return sum(1 for _ in path.open()) if path.exists() else 0


def train_rl_runs(warm: str, out: Path, steps: int, seed: int, start: float, every_s: float = 30.0,
                  llm: Future | None = None) -> dict[str, str]:
    """COREA (L1), RLVR and Brier from the same warm start, side by side on the cluster (each run's phases
    are sequential, so three runs keep both cores busy); a line of steps done every ``every_s`` seconds (and
    whether ``llm``, the LLM stand-in's SFT, is still running). Returns role -> HF checkpoint folder."""
    from corea.train.loop import train

    labels = {role: label for role, (_, label) in RL_RUNS.items()}
    with ThreadPoolExecutor(len(RL_RUNS), thread_name_prefix="demo-rl") as pool:
        futures = {role: pool.submit(train, train_config(warm, out, steps, seed, role), progress=False)
                   for role in RL_RUNS}
        while wait(list(futures.values()), timeout=every_s).not_done:
            done = ", ".join(f"{labels[r]} {_steps_done(out / r)}/{steps}" for r in RL_RUNS)
            if llm is not None:
                done += "; LLM stand-in SFT " + ("done" if llm.done() else "running")
            print(f"  steps: {done}  (t = {time.perf_counter() - start:.0f} s)", flush=True)
        return {role: str(f.result() / "hf") for role, f in futures.items()}


def run_demo(out: str | Path = "runs/demo", serve: bool = True, steps: int | None = None, seed: int = 0,
             port: int = 8000, size: DemoSize = FULL) -> Path:
    """Run the pipeline; returns the report folder. With ``serve``, the endpoint stays up afterwards.
    ``steps`` overrides ``size.rl_steps``."""
    start = time.perf_counter()
    steps = steps or size.rl_steps
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    warm_sums, warm_ood, eval_records = register_demo_datasets(seed)
    if not ray.is_initialized():
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)  # 3 RL runs x 1.5

    _step(1, "SFT side by side (Ray Train + DeepSpeed): the warm-start SLM on sums, differences and choices; "
             "the LLM stand-in on the evaluation questions (it goes on training through stage 2)", start)
    base_slm = make_tiny_checkpoint(out / "models" / "base-slm", "slm", seed=seed, overwrite=True)
    base_llm = make_tiny_checkpoint(out / "models" / "base-llm", "llm", seed=seed, overwrite=True)
    with ThreadPoolExecutor(1, thread_name_prefix="demo-llm-sft") as pool:
        # The LLM stand-in is needed only for evaluation, and its SFT is the longest: it runs beside the
        # warm start and then beside the three RL runs, keeping both cores busy.
        llm_run = pool.submit(sft, str(base_llm), sft_examples(eval_records, seed + 1, size.llm_repeats),
                              out / "models" / "llm", SFTConfig(batch_size=32, lr=3e-3, lr_schedule="linear", seed=seed))
        examples = sft_examples(warm_sums, seed, size.sft_repeats) + sft_examples(warm_ood, seed + 2, size.ood_repeats)
        random.Random(seed).shuffle(examples)
        warm = sft(str(base_slm), examples, out / "models" / "slm-warm", SFTConfig(batch_size=32, lr=3e-3, seed=seed))

        _step(2, "GRPO on Ray actors from the same warm start, on sums only: "
                 f"{', '.join(l for _, l in RL_RUNS.values())}", start)
        slms = train_rl_runs(str(warm), out, steps, seed, start, llm=llm_run)

        _step(3, "evaluation with Ray Data: seven systems and LLM-only on three dataset groups; the collaboration "
                 "strategies online; report", start)
        from corea.evaluate.paper_tables import table_one
        from corea.evaluate.run import evaluate, generate_records

        cfg = eval_config({"slm_verb": str(warm), **slms, "llm": str(out / "models" / "llm")}, out, seed, size)
        if not llm_run.done():  # the SLMs' side of the evaluation (and the baselines) while the LLM trains
            print(f"  the probe, the router and the SLMs' answers while the LLM stand-in's SFT finishes  "
                  f"(t = {time.perf_counter() - start:.0f} s)", flush=True)
            generate_records(cfg, only=[role for role in cfg.models.configured() if role != "llm"])
        if not llm_run.done():
            print(f"  waiting for the LLM stand-in's SFT  (t = {time.perf_counter() - start:.0f} s)", flush=True)
        llm = llm_run.result()
        print(f"  the LLM stand-in is trained: {llm}  (t = {time.perf_counter() - start:.0f} s)", flush=True)

    report = evaluate(cfg)
    summary = json.loads((report / "summary.json").read_text())
    print(table_one(summary))
    if summary.get("strategies"):
        from corea.evaluate.report import strategy_notes_md, strategy_table

        print("\nCollaboration strategies, online, on their held-out questions (all groups):\n"
              + strategy_table(summary["strategies"]))
        if strategy_notes_md(summary["strategies"]):
            print(strategy_notes_md(summary["strategies"]))
    ok, lines = verdict(summary)
    print("\nThe paper's claim (LLM-only the most accurate; COREA within 2 points of it for less), per group:")
    for line in lines:
        print("  " + line)
    print(("OK: " if ok else "NOT MET: ") + "in-domain " + ("meets" if ok else "does not meet") + " the claim")
    print(f"report: {report / 'report.md'}  (plots: {report}/*.png, numbers: {report / 'summary.json'})")

    _step(4, "serving the collaboration with Ray Serve (OpenAI-compatible): the cascade, and STEER, the stepwise "
             "policy and COPE as calibrated in stage 3", start)
    if not serve:
        print("skipped (--no-serve)")
        print(f"total {time.perf_counter() - start:.0f} s", flush=True)
        ray.shutdown()
        return report
    threshold = summary["systems"]["COREA"]["in_domain"].get("threshold", 0.5)
    from corea.evaluate.online import STRATEGY_DIR

    url = serve_collaboration(slms["corea"], str(llm), out, port, threshold, cfg.out_dir / STRATEGY_DIR)
    models = [m["id"] for m in httpx_get_models(url) if m["id"] not in ("corea-slm", "corea-llm")]
    for model, reply in sample_requests(url, models).items():
        meta = reply.get("corea", {})
        print(f"  {model}: 'What is 3 + 4?' -> {reply['choices'][0]['message']['content']!r} "
              f"(strategy {meta.get('strategy')}, tau {meta.get('threshold')}, LLM steps {meta.get('llm_steps')})")
    print(f"\nthe collaboration is serving at {url}/v1 (Ctrl-C stops it): models {', '.join(models)}. Try:\n"
          f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"corea-cascade\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is 12 + 45?\"}}]}}'")
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return report
