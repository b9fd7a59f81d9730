"""The RLCC driver: one loop over steps, each batch (rollout -> reward -> advantages) -> reference -> update -> sync."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from corea import metrics, storage
from corea.data import Record, load_dataset
from corea.models.loading import resolve_model_path
from corea.train.checkpoints import checkpoint_source, latest_checkpoint, read_state, truncate_jsonl, write_checkpoint
from corea.train.config import TrainConfig
from corea.train.pipeline import RolloutPipeline
from corea.train.pools import ClusterActors

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


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path | str:
    """Run RLCC (or RLVR with ``confidence_reward: none``) as configured; returns the last checkpoint (its URI
    with ``output.checkpoint_uri``).

    Per step: take the graded batch (``RolloutPipeline``: generated now, or up to ``rollout.max_staleness``
    steps ahead), reference log-probs, GRPO update, weights to the rollout workers; log; checkpoint."""
    entered = time.perf_counter()
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    records = training_records(cfg)
    policy_path = resolve_model(cfg.model.policy, out, cfg.model.seed)
    reference_path = resolve_model(cfg.model.reference or cfg.model.policy, out, cfg.model.seed)
    ckpt_uri = cfg.output.checkpoint_uri
    start, resume_from = 1, latest_checkpoint(out, ckpt_uri) if resume else None
    source = checkpoint_source(resume_from) if resume_from is not None else None  # a URI: actors read it there
    if resume_from is not None:
        start = read_state(resume_from)["step"] + 1
        truncate_jsonl(out / METRICS_FILE, start - 1)
        log.info("resuming from %s at step %d", resume_from, start)
    elif not resume:
        (out / METRICS_FILE).unlink(missing_ok=True)
    if not ray.is_initialized():
        ray.init()
    actors_began = time.perf_counter()
    actors = ClusterActors(cfg, storage.join(source, "hf") if source else policy_path, reference_path, cfg.name)
    startup = {"time/actors_start_s": time.perf_counter() - actors_began}
    if resume_from is not None:
        actors.load(source)
        actors.sync_weights(version=start - 1)
    pipeline = RolloutPipeline(cfg, actors, records, RolloutPipeline.load(resume_from))
    writer = _tensorboard(cfg)
    last = resume_from
    bar = tqdm(range(start, cfg.optim.steps + 1), desc=cfg.name, disable=not progress, initial=start - 1,
               total=cfg.optim.steps, dynamic_ncols=True)
    try:
        with logging_redirect_tqdm():
            for step in bar:
                timer, began = _Timer(), time.perf_counter()
                if step == start:  # once: train() entry to the first step (data, models, Ray actors started)
                    startup["time/startup_s"] = began - entered
                batch = pipeline.next(step)
                rank_stats = []
                if batch.sequences:  # empty only when every group was filtered out (no refill)
                    with timer("reference"):
                        ref_logprobs = actors.reference_logprobs(batch.sequences)
                    with timer("train"):
                        rank_stats = actors.train(batch.sequences, ref_logprobs, behaviour=cfg.rollout.max_staleness > 0)
                with timer("sync"):
                    actors.sync_weights(version=step)
                timer.seconds.update(batch.stats)
                timer.seconds["time/step_s"] = time.perf_counter() - began
                row = {"step": step, **step_metrics(batch.rewards, batch.rollouts), **_mean(rank_stats), **timer.seconds,
                       "weights_version": batch.weights_version, "staleness": step - 1 - batch.weights_version,
                       **(startup if step == start else {})}
                _log(out / METRICS_FILE, writer, row)
                bar.set_postfix_str(_postfix(row), refresh=False)
                if step % cfg.output.log_every == 0 or step == cfg.optim.steps:
                    log.info("step %d/%d  %s", step, cfg.optim.steps, _summary(row))
                if step % cfg.output.checkpoint_every == 0 or step == cfg.optim.steps:
                    last = write_checkpoint(out, step, lambda tmp, to: _save(actors, pipeline, tmp, policy_path, to),
                                            {"seed": cfg.seed, "data": {"n_records": len(records)}, "config": cfg.model_dump(mode="json")},
                                            cfg.output.keep_checkpoints, ckpt_uri)
                    log.debug("step %d: checkpoint %s", step, last)
    finally:
        if writer is not None:
            writer.close()
        actors.shutdown()
    return last


_POSTFIX = (("reward/total", "reward"), ("pass_at_1", "pass@1"), ("ece", "ece"), ("time/step_s", "s/step"))
_SUMMARY = _POSTFIX + (("auroc", "auroc"), ("confidence_output_ratio", "conf_out"), ("kl", "kl"),
                       ("response_length", "len"), ("staleness", "stale"))


def _postfix(row: dict) -> str:
    """The progress bar's few figures."""
    return " ".join(f"{short}={row[k]:.3g}" for k, short in _POSTFIX if k in row)


def _summary(row: dict) -> str:
    """One line every ``output.log_every`` steps; the full row is in metrics.jsonl and TensorBoard."""
    return "  ".join(f"{short} {row[k]:.3g}" for k, short in _SUMMARY if k in row)


def _save(actors: ClusterActors, pipeline: RolloutPipeline, folder: Path, tokenizer_path: str, ranks_to: str) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    actors.save(ranks_to)  # the policy ranks' part: the same folder, or the step's URI
    pipeline.save(folder)
    tokenizer_path = resolve_model_path(tokenizer_path, weights=False)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(folder / "hf")
    try:
        GenerationConfig.from_pretrained(tokenizer_path).save_pretrained(folder / "hf")
    except OSError:
        pass  # the base checkpoint has no generation config


def _mean(rank_stats: list[dict]) -> dict[str, float]:
    if not rank_stats:
        return {}
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
