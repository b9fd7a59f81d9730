"""The RLCC driver: one loop over steps, each rollout -> reward -> reference -> advantages -> update -> sync."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from corea import metrics
from corea.data import Record, load_dataset
from corea.engines import SamplingParams
from corea.train.checkpoints import latest_checkpoint, prompt_indices, read_state, select, truncate_jsonl, write_checkpoint
from corea.train.config import TrainConfig
from corea.train.grpo import group_advantages
from corea.train.pools import ClusterActors
from corea.train.sequences import RolloutSequence

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


def resolve_model(spec: str, out_dir: Path, seed: int) -> str:
    """``tiny:slm`` / ``tiny:llm`` -> a tiny checkpoint built under ``out_dir/models``; else the path itself."""
    if spec.startswith("tiny:"):
        from corea.models import make_tiny_checkpoint

        size = spec.split(":", 1)[1]
        folder = out_dir / "models" / f"tiny-{size}-seed{seed}"
        if not (folder / "config.json").exists():
            make_tiny_checkpoint(folder, size=size, seed=seed)
        return str(folder.resolve())
    return spec


def training_records(cfg: TrainConfig) -> list[Record]:
    d = cfg.data
    return load_dataset(d.dataset, path=d.path, limit=d.limit, split=d.split, seed=cfg.seed)


class _Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[f"time/{name}_s"] = time.perf_counter() - start


def step_metrics(rewards: list[list[dict]], rollouts: list[dict]) -> dict[str, float]:
    """Reward components and calibration of one step's responses."""
    flat = [r for group in rewards for r in group]
    conf = [r["confidence"] for r in flat]
    correct = [r["correctness"] > 0.5 for r in flat]
    lengths = [len(s["token_ids"]) for g in rollouts for s in g["samples"]]
    out = {
        "reward/total": float(np.mean([r["total"] for r in flat])),
        "reward/correctness": float(np.mean([r["correctness"] for r in flat])),
        "reward/format": float(np.mean([r["format"] for r in flat])),
        "reward/confidence": float(np.mean([r["confidence_reward"] for r in flat])),
        "pass_at_1": metrics.pass_at_1(correct),
        "ece": metrics.ece(conf, correct),
        "auroc": metrics.auroc(conf, correct),
        "brier": metrics.brier(conf, correct),
        "aurc": metrics.aurc(conf, correct),
        **{f"selective_accuracy@{round(100 * q)}": metrics.selective_accuracy(conf, correct, q)
           for q in metrics.SELECTIVE_COVERAGES},
        "confidence_output_ratio": metrics.confidence_output_ratio(conf),
        "response_length": float(np.mean(lengths)),
        "truncated_fraction": float(np.mean([s["finish_reason"] == "length" for g in rollouts for s in g["samples"]])),
    }
    return out


def _to_sequences(rollouts: list[dict], rewards: list[list[dict]], n: int) -> list[RolloutSequence]:
    totals = torch.tensor([r["total"] for group in rewards for r in group], dtype=torch.float32)
    advantages = group_advantages(totals, n).tolist()
    seqs = [RolloutSequence(g["prompt_ids"], s["token_ids"], rollout_logprobs=s["logprobs"])
            for g in rollouts for s in g["samples"]]
    for seq, adv in zip(seqs, advantages):
        seq.advantage = adv
    return seqs


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run RLCC (or RLVR with ``confidence_reward: none``) as configured; returns the last checkpoint."""
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    records = training_records(cfg)
    policy_path = resolve_model(cfg.model.policy, out, cfg.model.seed)
    reference_path = resolve_model(cfg.model.reference or cfg.model.policy, out, cfg.model.seed)
    start, resume_from = 1, latest_checkpoint(out) if resume else None
    if resume_from is not None:
        start = read_state(resume_from)["step"] + 1
        truncate_jsonl(out / METRICS_FILE, start - 1)
        log.info("resuming from %s at step %d", resume_from, start)
    elif not resume:
        (out / METRICS_FILE).unlink(missing_ok=True)
    if not ray.is_initialized():
        ray.init()
    actors = ClusterActors(cfg, str(resume_from / "hf") if resume_from else policy_path, reference_path, cfg.name)
    if resume_from is not None:
        actors.load(str(resume_from))
        actors.sync_weights(version=start - 1)
    writer = _tensorboard(cfg)
    params = SamplingParams(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                            max_tokens=cfg.rollout.max_tokens)
    last = resume_from
    bar = tqdm(range(start, cfg.optim.steps + 1), desc="rlcc", disable=not progress, initial=start - 1, total=cfg.optim.steps)
    try:
        for step in bar:
            timer = _Timer()
            batch = select(records, prompt_indices(len(records), step, cfg.rollout.prompts_per_step, cfg.seed))
            step_params = SamplingParams(**{**params.__dict__, "seed": cfg.seed * 1_000_003 + step})
            with timer("rollout"):
                rollouts = actors.generate([r.messages() for r in batch], step_params)
            with timer("reward"):
                groups = [([s["text"] for s in g["samples"]], r.gold, r.kind, r.prompt()) for g, r in zip(rollouts, batch)]
                rewards = actors.score(groups)
            sequences = _to_sequences(rollouts, rewards, cfg.rollout.n)
            with timer("reference"):
                ref_logprobs = actors.reference_logprobs(sequences)
            with timer("train"):
                rank_stats = actors.train(sequences, ref_logprobs)
            with timer("sync"):
                actors.sync_weights(version=step)
            timer.seconds["time/step_s"] = sum(timer.seconds.values())
            row = {"step": step, **step_metrics(rewards, rollouts), **_mean(rank_stats), **timer.seconds,
                   "weights_version": rollouts[0]["weights_version"]}
            _log(out / METRICS_FILE, writer, row)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("reward/total", "pass_at_1", "ece", "kl")})
            if step % cfg.output.checkpoint_every == 0 or step == cfg.optim.steps:
                last = write_checkpoint(out, step, lambda tmp: _save(actors, tmp, policy_path),
                                        {"seed": cfg.seed, "data": {"n_records": len(records)}, "config": cfg.model_dump(mode="json")},
                                        cfg.output.keep_checkpoints)
                log.info("step %d: checkpoint %s", step, last)
    finally:
        if writer is not None:
            writer.close()
        actors.shutdown()
    return last


def _save(actors: ClusterActors, folder: Path, tokenizer_path: str) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    actors.save(str(folder))
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(folder / "hf")
    try:
        GenerationConfig.from_pretrained(tokenizer_path).save_pretrained(folder / "hf")
    except OSError:
        pass  # the base checkpoint has no generation config


def _mean(rank_stats: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([s[k] for s in rank_stats])) for k in rank_stats[0]}


def _tensorboard(cfg: TrainConfig):
    if not cfg.output.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(cfg.out_dir / "tensorboard"))


def _log(path: Path, writer, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not np.isnan(value):
                writer.add_scalar(key, value, row["step"])
        writer.flush()
    log.info("step %d %s", row["step"], {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
