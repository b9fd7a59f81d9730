"""Seconds per GRPO step: this project's Ray trainer (``corea.train.loop.train``) against TRL's ``GRPOTrainer``.

Method: one tiny Qwen2 checkpoint (``make_tiny_checkpoint("slm", seed=0)``) is the policy and the reference of
both trainers. Both see the same prompts in the same order: the chat messages of the training records the
tiny config loads (the shipped DeepMath sample, train split), the prompts of step k being those our loop picks
for step k (``prompt_indices``); TRL gets them as a dataset in that order with shuffling off. Both use the same
reward, the config's (L1 RLCC: correctness + format + -|c - p|, p the group accuracy), which TRL computes in a
reward function that regroups the batch's completions into consecutive groups of ``num_generations``. Same
group size G (``rollout.n`` = ``num_generations``), prompts per step, max completion tokens, temperature 1.0
(top-p 1, no top-k), KL coefficient (k3 estimator, ``beta``), entropy coefficient, clip epsilon 0.2, AdamW with
a constant learning rate and gradient clipping 1.0, fp32, no gradient checkpointing, one optimizer step per
generation batch (prompts x G sequences, accumulated over micro-batches of the same size in both) and one
policy update per rollout (``num_iterations=1``); loss ``bnpo`` in TRL (token mean per micro-batch, divided by
the accumulation steps), which is our loss.

Ours runs on a fresh local Ray cluster (``ray.init(address="local", num_cpus=<cores>)``, no dashboard) with
the config's actors and resources (rollout worker, reward actor, reference actor, one DeepSpeed rank on its CPU
accelerator); no TensorBoard, and checkpoints only after the last step (outside the timed steps). Its step time
is the wall time between consecutive rows of ``metrics.jsonl`` (the loop body: rollout, reward, reference,
train, weight sync and the driver's own work), and the split is the row's ``time/*_s``. TRL runs in this process
(``use_vllm=False``, ``use_cpu=True``, ``report_to=[]``, no saving); its step time is ``on_step_begin`` to
``on_step_end`` of a ``TrainerCallback``, and its split is timed around its ``_generate`` and the reward function.
Threads: Ray gives each of our fractional-CPU actors ``OMP_NUM_THREADS=1`` and the loop runs one stage at a
time, so TRL gets ``torch.set_num_threads(1)`` by default (``--trl-threads 0`` leaves torch's default).
The first ``--warmup`` steps of each are left out (ours: actor start-up, model loading, DeepSpeed set-up and
first calls; TRL: first-call overheads). Ours runs first and its Ray cluster is shut down before TRL starts.

    python bench/train_step.py [--prompts 4] [--n 4] [--max-tokens 32] [--warmup 2] [--steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

COREA_PARTS = ("rollout", "reward", "reference", "train", "sync")


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


def step_prompts(records, steps: int, prompts_per_step: int, seed: int) -> list[list]:
    """The records of each step (1-based), exactly as ``corea.train.loop.train`` selects them."""
    from corea.train.checkpoints import prompt_indices, select

    return [select(records, prompt_indices(len(records), s, prompts_per_step, seed)) for s in range(1, steps + 1)]


def corea_reward_func(group_size: int, confidence_reward: str, weights, timings: list[float]):
    """A TRL reward function computing corea's group-level RLCC reward (e.g. L1) over the whole batch.

    TRL passes the generation batch with the completions of each prompt consecutive (``num_generations`` each);
    they are regrouped here so that the group accuracy p is that of the G responses to one prompt."""
    from corea.rewards import batch_group_rewards

    def corea_reward(prompts, completions, gold, kind, user_prompt, **_) -> list[float]:
        start = time.perf_counter()
        if len(completions) % group_size:
            raise ValueError(f"{len(completions)} completions do not split into groups of {group_size}")
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        groups, group_prompts = [], []
        for i in range(0, len(texts), group_size):
            if len({(gold[j], user_prompt[j]) for j in range(i, i + group_size)}) != 1:
                raise ValueError("a group of completions spans several prompts")
            groups.append((texts[i : i + group_size], gold[i], kind[i]))
            group_prompts.append(user_prompt[i])
        rewards = batch_group_rewards(groups, confidence_reward, weights, group_prompts)
        timings.append(time.perf_counter() - start)
        return [r.total for group in rewards for r in group]

    return corea_reward


def run_corea(args, work: Path, model_path: Path) -> dict:
    import ray

    import corea.train.loop as loop
    from corea.train.config import load_config

    total_steps = args.warmup + args.steps
    cfg = load_config(
        args.config,
        {
            "model.policy": str(model_path),
            "model.reference": str(model_path),
            "rollout.n": args.n,
            "rollout.prompts_per_step": args.prompts,
            "rollout.max_tokens": args.max_tokens,
            "rollout.temperature": 1.0,
            "rollout.top_p": 1.0,
            "optim.steps": total_steps,
            "optim.train_batch_prompts": args.prompts,  # one optimizer step per rollout step
            "optim.micro_batch_size": args.micro_batch,
            "optim.lr": args.lr,
            "optim.kl_coef": args.kl_coef,
            "optim.entropy_coef": args.entropy_coef,
            "optim.clip_eps": 0.2,
            "optim.max_grad_norm": 1.0,
            "optim.precision": "fp32",
            "optim.gradient_checkpointing": False,
            "output.dir": str(work / "corea"),
            "output.checkpoint_every": 10**9,  # only after the last step
            "output.tensorboard": False,
        },
    )
    stamps: list[float] = []
    original_log = loop._log

    def timed_log(path, writer, row):
        stamps.append(time.perf_counter())
        original_log(path, writer, row)

    init_start = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    ray_init_s = time.perf_counter() - init_start
    loop._log = timed_log
    start = time.perf_counter()
    try:
        loop.train(cfg, progress=False)
    finally:
        loop._log = original_log
        end = time.perf_counter()
        ray.shutdown()
    rows = [json.loads(line) for line in (cfg.out_dir / loop.METRICS_FILE).read_text().splitlines()]
    walls = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    measured = list(range(args.warmup, total_steps))
    wall = [walls[i] for i in measured]
    parts = {p: statistics.fmean(rows[i][f"time/{p}_s"] for i in measured) for p in COREA_PARTS}
    parts["driver_other"] = statistics.fmean(wall) - sum(parts.values())
    return {
        "measured_steps": [rows[i]["step"] for i in measured],
        "step_s": _stats(wall),
        "per_step_s": wall,
        "warmup_step_s": walls[: args.warmup],
        "breakdown_s": parts,
        "response_length": statistics.fmean(rows[i]["response_length"] for i in measured),
        "total_run_s": end - start,
        "ray_init_s": ray_init_s,
        "startup_s": rows[0].get("time/startup_s"),  # train() entry to step 1: data, models, actors started
        "actors_start_s": rows[0].get("time/actors_start_s"),
        "first_step_s": walls[0] - (rows[0].get("time/startup_s") or 0.0),
    }


def run_trl(args, work: Path, model_path: Path, per_step, reward_cfg) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.trl_threads:
        torch.set_num_threads(args.trl_threads)
    total_steps = args.warmup + args.steps
    rows = [
        {"prompt": r.messages(), "gold": r.gold, "kind": r.kind, "user_prompt": r.prompt()}
        for batch in per_step
        for r in batch
    ]
    dataset = Dataset.from_list(rows)
    sequences = args.prompts * args.n
    config = GRPOConfig(
        output_dir=str(work / "trl"),
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        max_steps=total_steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=sequences // args.micro_batch,  # one optimizer step = prompts x G sequences
        num_generations=args.n,
        num_iterations=1,
        max_completion_length=args.max_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.kl_coef,
        epsilon=0.2,
        entropy_coef=args.entropy_coef,
        loss_type="bnpo",
        scale_rewards="group",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        optim="adamw_torch",
        shuffle_dataset=False,
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32},
    )
    reward_times: list[float] = []
    setup_start = time.perf_counter()
    trainer = GRPOTrainer(
        model=str(model_path),
        reward_funcs=[corea_reward_func(args.n, reward_cfg.confidence_reward, reward_cfg.weights, reward_times)],
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_path),
    )
    if getattr(trainer.args, "activation_checkpointing", False) or trainer.args.gradient_checkpointing:
        raise RuntimeError("TRL would checkpoint activations; this benchmark compares without")
    gen_times: list[float] = []
    generate = trainer._generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            gen_times.append(time.perf_counter() - t0)

    trainer._generate = timed_generate
    setup_s = time.perf_counter() - setup_start

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin: float | None = None
            self.steps: list[float] = []
            self.ends: list[float] = []
            self.gen_mark = self.reward_mark = 0
            self.split: list[tuple[float, float]] = []
            self.logs: list[dict] = []

        def on_step_begin(self, args_, state, control, **kw):
            self.begin = time.perf_counter()
            self.gen_mark, self.reward_mark = len(gen_times), len(reward_times)

        def on_step_end(self, args_, state, control, **kw):
            now = time.perf_counter()
            self.steps.append(now - self.begin)
            self.ends.append(now)
            self.split.append((sum(gen_times[self.gen_mark :]), sum(reward_times[self.reward_mark :])))

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs))

    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # TRL's per-step log dicts; the figures are printed below
    timer = StepTimer()
    trainer.add_callback(timer)
    start = time.perf_counter()
    trainer.train()
    end = time.perf_counter()
    if len(timer.steps) != total_steps:
        raise RuntimeError(f"TRL ran {len(timer.steps)} steps, expected {total_steps}")
    if len(gen_times) != total_steps or len(reward_times) != total_steps:
        raise RuntimeError(f"expected one generation and one reward call per step, got {len(gen_times)} and "
                           f"{len(reward_times)}")
    measured = list(range(args.warmup, total_steps))
    step = [timer.steps[i] for i in measured]
    between_ends = [timer.ends[i] - timer.ends[i - 1] for i in measured if i > 0]
    gen = statistics.fmean(timer.split[i][0] for i in measured)
    rew = statistics.fmean(timer.split[i][1] for i in measured)
    return {
        "measured_steps": [i + 1 for i in measured],
        "step_s": _stats(step),
        "per_step_s": step,
        "warmup_step_s": timer.steps[: args.warmup],
        "end_to_end_step_s": _stats(between_ends) if between_ends else None,
        "breakdown_s": {"generate": gen, "reward": rew,
                        "reference_train_optimizer": statistics.fmean(step) - gen - rew},
        "response_length": statistics.fmean(timer.logs[i]["completions/mean_length"] for i in measured)
        if len(timer.logs) >= total_steps else None,
        "torch_threads": torch.get_num_threads(),
        "total_run_s": end - start,
        "setup_s": setup_s,  # GRPOTrainer construction (model and reference loaded)
    }


def _uptime() -> str:
    import subprocess

    try:
        return "uptime: " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: %.2f %.2f %.2f" % os.getloadavg()


def _report(name: str, r: dict, run: str) -> None:
    s = r["step_s"]
    warm = ", ".join(f"{x:.2f}" for x in r["warmup_step_s"])
    print(f"\n{name}: measured steps {r['measured_steps']}")
    print(f"  s/step mean {s['mean']:.3f}  median {s['median']:.3f}  (min {s['min']:.3f}, max {s['max']:.3f})")
    before, after = r["load_avg_1min"]
    print(f"  warm-up steps {warm}; {run}; 1-min load average {before:.1f} -> {after:.1f}")
    length = r["response_length"]
    print("  split: " + ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown_s"].items())
          + (f"; mean response length {length:.1f} tokens" if length is not None else ""))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu-rlcc.yaml"),
                        help="data, reward weights and resources come from here")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--n", type=int, default=4, help="responses per prompt (G)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max completion tokens")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out at the start")
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-coef", type=float, default=0.001)
    parser.add_argument("--entropy-coef", type=float, default=0.001)
    parser.add_argument("--trl-threads", type=int, default=1,
                        help="torch threads for TRL (default 1, as Ray gives each of our fractional-CPU actors "
                             "OMP_NUM_THREADS=1; 0: torch's default, one per core)")
    parser.add_argument("--only", choices=["both", "corea", "trl"], default="both")
    parser.add_argument("--json", help="write the figures to this path")
    args = parser.parse_args(argv)
    if (args.prompts * args.n) % args.micro_batch:
        parser.error("--micro-batch must divide prompts x n")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from corea.models import make_tiny_checkpoint
    from corea.train.config import load_config
    from corea.train.loop import training_records

    tmp = tempfile.TemporaryDirectory(prefix="bench-train-step-")
    work = Path(tmp.name)
    model_path = make_tiny_checkpoint(work / "models" / "tiny-slm-seed0", "slm", seed=0)
    cfg = load_config(args.config)
    records = training_records(cfg)
    per_step = step_prompts(records, args.warmup + args.steps, args.prompts, cfg.seed)

    print(f"GRPO step time, tiny Qwen2 'slm' (seed 0), {cfg.data.dataset} ({cfg.data.split}, {len(records)} records); "
          f"{args.prompts} prompts x {args.n} responses, <= {args.max_tokens} new tokens, "
          f"micro-batch {args.micro_batch}, 1 optimizer step per rollout; {args.warmup} warm-up + {args.steps} "
          f"measured steps each; {os.cpu_count()} CPU cores")
    result: dict = {"setup": {k: v for k, v in vars(args).items() if k not in ("json", "only")}}
    if args.only in ("both", "corea"):
        load = os.getloadavg()[0]
        result["corea"] = ours = run_corea(args, work, model_path)
        ours["load_avg_1min"] = [load, os.getloadavg()[0]]
        _report("corea (Ray actors, DeepSpeed CPU)", ours,
                f"ray.init {ours['ray_init_s']:.1f} s + train() {ours['total_run_s']:.1f} s")
        if ours["startup_s"] is not None:
            print(f"  start-up: ray.init {ours['ray_init_s']:.1f} s, train() to step 1 {ours['startup_s']:.1f} s (actors "
                  f"{ours['actors_start_s']:.1f} s), first step {ours['first_step_s']:.1f} s")
        print(f"  {_uptime()}")
    if args.only in ("both", "trl"):
        import trl

        load = os.getloadavg()[0]
        result["trl"] = theirs = run_trl(args, work, model_path, per_step, cfg.reward)
        theirs["load_avg_1min"] = [load, os.getloadavg()[0]]
        _report(f"TRL {trl.__version__} GRPOTrainer (transformers generate, {theirs['torch_threads']} torch threads)",
                theirs, f"GRPOTrainer() {theirs['setup_s']:.1f} s + trainer.train() {theirs['total_run_s']:.1f} s")
        print(f"  {_uptime()}")
        if theirs["end_to_end_step_s"]:
            print(f"  end to end (step end to step end, with logging) mean {theirs['end_to_end_step_s']['mean']:.3f}")
    if "corea" in result and "trl" in result:
        c, t = result["corea"]["step_s"], result["trl"]["step_s"]
        result.update(corea_step_s=c["mean"], trl_step_s=t["mean"], ratio=t["mean"] / c["mean"],
                      ratio_median=t["median"] / c["median"], ratio_min=t["min"] / c["min"])
        result["breakdown"] = {"corea": result["corea"]["breakdown_s"], "trl": result["trl"]["breakdown_s"]}
        faster = "TRL is slower" if result["ratio"] > 1 else "corea is slower"
        print(f"\nratio trl/corea: mean {result['ratio']:.2f}, median {result['ratio_median']:.2f}, "
              f"fastest step {result['ratio_min']:.2f} ({faster}; on a busy machine the fastest steps are the "
              "least disturbed)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
