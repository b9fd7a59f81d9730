"""``corea demo``: the miniature COREA pipeline end to end on a local Ray cluster with tiny checkpoints.

1. warm start: a tiny SLM is fine-tuned (Ray Train + DeepSpeed) on the sums task, overconfident;
2. an LLM stand-in (the larger tiny size) is fine-tuned on the evaluation questions: it knows what the SLM
   does not, as a larger model would (no tiny model can be made truly stronger in minutes);
3. RLCC (L1) trains the SLM on Ray actors;
4. evaluation of SLM-Verb (the warm start), COREA and the LLM with Ray Data, the cascade at every threshold,
   the report with tables and plots;
5. the cascade served over HTTP (Ray Serve, OpenAI-compatible), with a sample request.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import ray

from corea.data import register_dataset
from corea.demo.task import build_splits, sft_examples
from corea.models import make_tiny_checkpoint
from corea.train.sft import SFTConfig, sft

log = logging.getLogger(__name__)
DATASET = "demo-sums"
#: The largest pass@1 drop against the LLM that the demo's cascade may show.
MAX_PASS_DROP = 0.05


def _step(n: int, text: str, start: float) -> None:
    print(f"\n[{n}/5] {text}  (t = {time.perf_counter() - start:.0f} s)", flush=True)


def train_config(policy: str, out: Path, steps: int, seed: int):
    from corea.train.config import TrainConfig

    return TrainConfig.model_validate({
        "name": "demo-rlcc", "seed": seed,
        "model": {"policy": policy},
        "data": {"dataset": f"{DATASET}-rl", "split": None},
        "reward": {"confidence_reward": "l1"},
        "rollout": {"n": 8, "prompts_per_step": 16, "temperature": 1.0, "max_tokens": 16},
        "optim": {"steps": steps, "train_batch_prompts": 16, "micro_batch_size": 32, "lr": 3e-4,
                  "kl_coef": 0.001, "zero_stage": 1},
        "resources": {"rollout_cpus": 0.5, "reward_cpus": 0.25, "trainer_cpus": 0.5, "reference_cpus": 0.25},
        "output": {"dir": str(out / "rlcc"), "checkpoint_every": steps, "keep_checkpoints": 1},
    })


def eval_config(paths: dict[str, str], out: Path, seed: int):
    from corea.evaluate.config import EvalConfig

    return EvalConfig.model_validate({
        "name": "demo", "seed": seed, "output_dir": str(out / "eval"),
        "models": {role: {"path": path} for role, path in paths.items()},
        "datasets": [{"name": DATASET}],
        "generation": {"runs": 2, "temperature": 0.6, "max_tokens": 16},
        "engine": {"backend": "transformers", "options": {"device": "cpu", "max_batch_size": 32},
                   "concurrency": 1, "batch_size": 32, "num_cpus": 1, "grade_concurrency": 1, "grade_cpus": 0.5},
        "selection": {"calibration_fraction": 0.5, "max_drops": [MAX_PASS_DROP], "cost_budgets": [0.8]},
        "metrics": {"n_boot": 200},
    })


def check(summary: dict, max_drop: float = MAX_PASS_DROP) -> tuple[bool, str]:
    """COREA's relative cost below 1 (LLM-only) with a pass@1 drop against the LLM of at most ``max_drop``."""
    corea = summary["systems"]["COREA"]["in_domain"]
    llm = summary["llm"]["in_domain"]["pass_at_1"]
    drop = llm - corea["pass_at_1"]
    ok = corea["relative_cost"] < 1.0 and drop <= max_drop
    return ok, (f"COREA pass@1 {corea['pass_at_1']:.3f} vs LLM {llm:.3f} (drop {drop:+.3f}, target <= {max_drop}); "
                f"cost {corea['relative_cost']:.2f} x LLM-only, LLM answers {corea['llm_pct']:.0f}% of questions")


def serve_cascade(slm: str, llm: str, out: Path, port: int, threshold: float) -> str:
    """Deploy the cascade (one replica per tier, CPU fractions that fit 2 cores); returns its base URL."""
    from corea.serve.app import deploy
    from corea.serve.config import load_serve_config

    tier = {"resources": {"num_cpus": 0.5}, "torch_threads": 1,
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8}}
    cfg = load_serve_config({
        "name": "corea", "work_dir": str(out / "serve"), "http": {"host": "127.0.0.1", "port": port},
        "cascade": {"threshold": threshold}, "ingress": {"resources": {"num_cpus": 0.25}},
        "slm": {"model": slm, **tier}, "llm": {"model": llm, **tier},
    })
    return deploy(cfg)[cfg.name]


def sample_request(url: str) -> dict:
    import httpx

    body = {"model": "corea-cascade", "messages": [{"role": "user", "content": "What is 3 + 4?"}], "max_tokens": 16}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    response.raise_for_status()
    return response.json()


def run_demo(out: str | Path = "runs/demo", serve: bool = True, steps: int = 100, seed: int = 0, port: int = 8000) -> Path:
    """Run the pipeline; returns the report folder. With ``serve``, the endpoint stays up afterwards."""
    start = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    splits = build_splits(seed)
    register_dataset(f"{DATASET}-rl", loader=lambda _p: splits.rl, path=out, overwrite=True)
    register_dataset(DATASET, loader=lambda _p: splits.eval, path=out, group="in_domain", overwrite=True)
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)

    _step(1, "warm start: SFT of a tiny SLM on the sums task (Ray Train + DeepSpeed)", start)
    base_slm = make_tiny_checkpoint(out / "models" / "base-slm", "slm", seed=seed, overwrite=True)
    warm = sft(str(base_slm), sft_examples(splits.sft, seed, 120), out / "models" / "slm-warm",
               SFTConfig(batch_size=32, lr=3e-3, seed=seed))

    _step(2, "LLM stand-in: SFT of the larger tiny model on the evaluation questions", start)
    base_llm = make_tiny_checkpoint(out / "models" / "base-llm", "llm", seed=seed, overwrite=True)
    llm = sft(str(base_llm), sft_examples(splits.eval, seed + 1, 120), out / "models" / "llm",
              SFTConfig(batch_size=32, lr=3e-3, seed=seed))

    _step(3, f"RLCC (L1) training of the SLM for {steps} GRPO steps on Ray actors", start)
    from corea.train.loop import train

    rlcc = train(train_config(str(warm), out, steps, seed)) / "hf"

    _step(4, "evaluation with Ray Data: SLM-Verb, COREA, LLM; cascade sweep; report and plots", start)
    from corea.evaluate.run import evaluate

    report = evaluate(eval_config({"slm_verb": str(warm), "corea": str(rlcc), "llm": str(llm)}, out, seed))
    summary = json.loads((report / "summary.json").read_text())
    ok, verdict = check(summary)
    print(("OK: " if ok else "NOT MET: ") + verdict)
    print(f"report: {report / 'report.md'}  (plots: {report}/*.png, numbers: {report / 'summary.json'})")

    _step(5, "serving the cascade with Ray Serve (OpenAI-compatible)", start)
    if not serve:
        print("skipped (--no-serve)")
        ray.shutdown()
        return report
    threshold = summary["systems"]["COREA"]["in_domain"].get("threshold", 0.5)
    url = serve_cascade(str(rlcc), str(llm), out, port, threshold)
    reply = sample_request(url)
    meta = reply.get("corea", {})
    print(f"sample request 'What is 3 + 4?' -> {reply['choices'][0]['message']['content']!r}; {json.dumps(meta)}")
    print(f"\nthe cascade is serving at {url}/v1 (Ctrl-C stops it). Try:\n"
          f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"corea-cascade\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is 12 + 45?\"}}]}}'")
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return report
