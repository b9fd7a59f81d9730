"""The paper in miniature: RLCC calibrates an overconfident SLM; RLVR from the same start does not.

Method
  Task: "What is a + b?". Taught sums have single-digit operands (a, b in 0..9); untaught sums have two-digit
  operands (10..99). A tiny random Qwen2 model is warm-started by SFT (Ray Train + DeepSpeed) on every taught
  sum and on 100 untaught sums, each answer followed by a confidence drawn mostly from {0.9, 1.0}
  (P(1.0) = 0.6, P(0.9) = 0.15, 0.0..0.8 share the rest): an overconfident start, like the paper's step 0.
  It learns the taught sums but cannot generalize to unseen two-digit sums: a learnable skill boundary.
  From that start, RLCC-L1 and RLVR (no confidence reward) each train for 100 GRPO steps (16 prompts x 8
  responses, temperature 1.0, lr 3e-4, KL 0.001) on the same prompts, with the project's Ray trainer. The RL
  set is balanced: 60 taught sums and 60 unseen two-digit sums. RLCC first lowers its confidence everywhere
  (ECE falls, AUROC flat) and only later learns where its skill ends; with 60 taught vs 100 unseen sums the
  hard prompts' "lower it" signal dominates longer (AUROC ~0.6 until step ~60, 0.5 at eval after 40 steps),
  while the balanced set reaches AUROC 0.8 about 20 steps sooner. Confidences tokenize digit by digit
  ("1", ".", "0"), so every value in 0.0..1.0 is reachable.
  Held-out evaluation: 80 unseen two-digit sums plus the 40 taught sums outside the RL set, 4 samples each
  at temperature 0.6; ECE (10 bins), AUROC and pass@1 of the warm start, RLCC and RLVR. The plot shows ECE
  and AUROC of each run's training rollouts per step.
Targets: ECE(RLCC) <= ECE(warm start) / 2, AUROC(RLCC) >= 0.75, ECE(RLVR) >= 2 * ECE(RLCC), under 15 min.

    python bench/calibration.py [--steps 100] [--out runs/calibration] [--json PATH]
    python bench/calibration.py --warm runs/calibration/warm --runs rlcc    # RL only, from a saved warm start
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corea import grading, metrics  # noqa: E402
from corea.data import Record, register_dataset  # noqa: E402
from corea.demo.task import build_splits, sft_examples  # noqa: E402
from corea.engines import SamplingParams, load_engine  # noqa: E402
from corea.models import make_tiny_checkpoint  # noqa: E402
from corea.protocol import parse_response  # noqa: E402
from corea.train.config import TrainConfig  # noqa: E402
from corea.train.loop import train  # noqa: E402
from corea.train.sft import SFTConfig, sft  # noqa: E402

def evaluate(model_path: str, records: list[Record], samples: int = 4, temperature: float = 0.6) -> dict:
    engine = load_engine(model_path)
    gens = engine.generate([r.messages() for r in records],
                           SamplingParams(n=samples, temperature=temperature, max_tokens=16, seed=1234))
    texts = [[s.text for s in g.samples] for g in gens]
    verdicts = grading.grade_groups([(ts, r.gold, r.kind) for ts, r in zip(texts, records)])
    conf = [parse_response(t).confidence for ts in texts for t in ts]
    correct = [v for vs in verdicts for v in vs]
    taught = [r.meta["taught"] for r in records for _ in range(samples)]

    def mean_conf(keep) -> float:
        vals = [c for c, k in zip(conf, keep) if k and c is not None]
        return float(sum(vals) / max(1, len(vals)))

    return {"ece": metrics.ece(conf, correct), "auroc": metrics.auroc(conf, correct),
            "pass_at_1": metrics.pass_at_1(correct), "confidence_output_ratio": metrics.confidence_output_ratio(conf),
            "mean_confidence": mean_conf([True] * len(conf)),
            "conf_taught": mean_conf(taught), "conf_untaught": mean_conf([not t for t in taught]),
            "acc_taught": metrics.pass_at_1([y for y, t in zip(correct, taught) if t]),
            "acc_untaught": metrics.pass_at_1([y for y, t in zip(correct, taught) if not t])}


#: GRPO settings shared by both runs (only the confidence reward differs); overridable from the command line.
RL_DEFAULTS = {"n": 8, "prompts": 16, "train_batch": 16, "lr": 3e-4, "kl": 0.001, "temperature": 1.0, "max_staleness": 0}


def rl_config(name: str, reward: str, policy: str, out: Path, steps: int, seed: int, hp: dict) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": name, "seed": seed,
        "model": {"policy": policy},
        "data": {"dataset": "calibration-sums-rl", "split": None},
        "reward": {"confidence_reward": reward},
        "rollout": {"n": hp["n"], "prompts_per_step": hp["prompts"], "temperature": hp["temperature"],
                    "max_tokens": 16, "max_staleness": hp["max_staleness"]},
        "optim": {"steps": steps, "train_batch_prompts": hp["train_batch"], "micro_batch_size": hp["n"] * hp["train_batch"],
                  "lr": hp["lr"], "kl_coef": hp["kl"], "entropy_coef": 0.0, "zero_stage": 1},
        "resources": {"rollout_cpus": 0.5, "reward_cpus": 0.25, "trainer_cpus": 0.5, "reference_cpus": 0.25},
        "output": {"dir": str(out / name), "checkpoint_every": steps, "keep_checkpoints": 1, "tensorboard": False},
    })


def plot(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, folder in runs.items():
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["ece"] for r in rows], label=name)
        axes[1].plot(steps, [r["auroc"] for r in rows], label=name)
    axes[0].set(title="ECE of training rollouts (lower is better)", xlabel="step", ylabel="ECE")
    axes[1].set(title="AUROC of training rollouts (higher is better)", xlabel="step", ylabel="AUROC", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sft-repeats", type=int, default=120, help="passes over the SFT set (batch 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/calibration")
    parser.add_argument("--warm", help="an existing warm-start checkpoint: skip the SFT")
    parser.add_argument("--runs", default="rlcc,rlvr", help="which RL runs (comma-separated: rlcc, rlvr)")
    for key, value in RL_DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--rl-hard", type=int, default=60, help="unseen two-digit sums in the RL set (60 taught)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    hp = {k: getattr(args, k) for k in RL_DEFAULTS}
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(__doc__.split("Targets:")[0])
    splits = build_splits(args.seed, args.rl_hard)
    sft_set, rl_set, eval_set = splits.sft, splits.rl_prompts(), splits.eval
    register_dataset("calibration-sums-rl", loader=lambda _path: rl_set, path=out, overwrite=True)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    if args.warm:
        warm = Path(args.warm).resolve()
    else:
        base = make_tiny_checkpoint(out / "base", "slm", seed=args.seed, overwrite=True)
        warm = sft(str(base), sft_examples(sft_set, args.seed, args.sft_repeats), out / "warm",
                   SFTConfig(epochs=1, batch_size=32, lr=3e-3, seed=args.seed))
    results = {"warm_start": evaluate(str(warm), eval_set)}
    print(f"warm start ready after {time.perf_counter() - start:.0f} s: {_fmt(results['warm_start'])}", flush=True)
    runs = {}
    for name, reward in (("rlcc", "l1"), ("rlvr", "none")):
        if name not in args.runs.split(","):
            continue
        cfg = rl_config(name, reward, str(warm), out, args.steps, args.seed, hp)
        last = train(cfg, progress=False)
        runs[name] = cfg.out_dir
        results[name] = evaluate(str(last / "hf"), eval_set)
        print(f"{name} done after {time.perf_counter() - start:.0f} s: {_fmt(results[name])}", flush=True)
    ray.shutdown()
    plot(runs, out / "calibration.png")
    wall = time.perf_counter() - start
    print(f"\nheld-out: {len(eval_set)} prompts x 4 samples, temperature 0.6; {args.steps} GRPO steps per run")
    print(f"{'model':<12}{'ECE':>8}{'AUROC':>8}{'pass@1':>8}{'conf':>8}{'conf|taught':>13}{'conf|untaught':>15}")
    for name, r in results.items():
        print(f"{name:<12}{r['ece']:>8.3f}{r['auroc']:>8.3f}{r['pass_at_1']:>8.3f}{r['mean_confidence']:>8.3f}"
              f"{r['conf_taught']:>13.3f}{r['conf_untaught']:>15.3f}")
    if not {"rlcc", "rlvr"} <= results.keys():
        return 0
    w, c, v = results["warm_start"], results["rlcc"], results["rlvr"]
    checks = {"ece_halved": c["ece"] <= w["ece"] / 2, "auroc_at_least_0.75": c["auroc"] >= 0.75,
              "rlvr_ece_at_least_twice": v["ece"] >= 2 * c["ece"], "under_15_min": wall < 900}
    print(f"targets: {checks}; wall {wall:.0f} s; plot {out / 'calibration.png'}")
    if args.json_path:
        keys = ("ece", "auroc", "pass_at_1")
        payload = {k: {m: results[k][m] for m in keys} for k in results} | {"wall_s": wall, "targets": checks}
        Path(args.json_path).write_text(json.dumps(payload, indent=2))
    return 0


def _fmt(r: dict) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in r.items())


if __name__ == "__main__":
    sys.exit(main())
