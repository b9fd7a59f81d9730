"""Supervised fine-tuning with Ray Train (``TorchTrainer``) and DeepSpeed: warm starts and the Router baseline.

Each example is a chat prompt and the target response; the loss is the mean token cross-entropy of the
response tokens only (the prompt is context). Precision and ZeRO as the policy (``corea.train.zero_params``):
bf16 on GPU with fp32 gradient accumulation, ZeRO-3 models built partitioned. At the end every rank takes part in
consolidating the weights (a collective under ZeRO-3) and rank 0 writes the Hugging Face checkpoint atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Literal, Sequence

import ray
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)
METRICS_FILE = "sft_metrics.json"  #: in the output checkpoint: {"history": [{"epoch", "loss", "steps", "lr"}, ...]}


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1, description="sequences per worker per step")
    lr: float = Field(1e-4, gt=0)
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant", description="linear: lr x (1 - step / total steps), decaying to 0 at the last step")
    weight_decay: float = Field(0.0, ge=0)
    zero_stage: int = Field(1, ge=0, le=3)
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    use_gpu: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _precision_fits(self) -> "SFTConfig":
        if self.use_gpu and self.zero_stage == 0:
            raise ValueError("use_gpu trains in bf16, which needs zero_stage >= 1 (fp32 gradient accumulation)")
        return self

    @property
    def precision(self) -> str:
        return "bf16" if self.use_gpu else "fp32"


def _render(tokenizer, prompt) -> str:
    """A plain-text prompt as is; chat messages through the chat template with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def _tokenize(tokenizer, prompt_text: str, response: str) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS and the number of prompt tokens."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, len(prompt_ids)


def lr_factor(schedule: str, total_steps: int):
    """The learning-rate multiplier at optimizer step s (0-based): 1 (constant) or max(0, 1 - s / total_steps)."""
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: max(0.0, 1.0 - step / max(total_steps, 1))


def _train_loop(config: dict) -> None:
    """Ray Train worker. Per-epoch losses go to ``METRICS_FILE`` in the checkpoint, not to ``train.report``:
    Ray Train 2.60 keeps only checkpoint reports in its ``Result``, and each report waits for the controller's
    next poll (up to ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s) because a worker's result queue holds one."""
    import deepspeed
    import torch
    from ray import train
    from corea.models import load_model_and_tokenizer
    from corea.train.sequences import RolloutSequence, pack
    from corea.train.zero_params import ds_config, export_hf

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    cfg = SFTConfig(**config["sft"])
    torch.manual_seed(cfg.seed)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")  # before a ZeRO-3 load
    ds = ds_config(cfg.batch_size, 1, cfg.zero_stage, cfg.precision, max_grad_norm=1.0)
    dtype = "bfloat16" if cfg.precision == "bf16" else "float32"
    model, tokenizer = load_model_and_tokenizer(config["model_path"], dtype, "cpu", deepspeed_config=ds)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.lr_schedule, config["total_steps"]))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine.train()  # the loader returns the model in eval mode
    shard = train.get_dataset_shard("train")
    history = []
    for epoch in range(cfg.epochs):
        losses = []
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="pandas", local_shuffle_buffer_size=256,
                                        local_shuffle_seed=cfg.seed + epoch):
            seqs = []
            for prompt, response in zip(batch["prompt"], batch["response"]):
                ids, n_prompt = _tokenize(tokenizer, prompt, response)
                seqs.append(RolloutSequence(ids[:n_prompt], ids[n_prompt:]))
            packed = pack(seqs, pad).to(engine.device)
            logits = engine(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                                    packed.targets.reshape(-1), reduction="none").view_as(packed.mask)
            loss = (nll * packed.mask).sum() / packed.mask.sum().clamp(min=1)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        history.append({"epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1), "steps": len(losses),
                        "lr": scheduler.get_last_lr()[0]})
    export_hf(engine, config["out_dir"], train.get_context().get_world_rank(), tokenizer=tokenizer,  # all ranks
              extra_json={METRICS_FILE: {"history": history}})


def sft(model_path: str, examples: Sequence[dict], out_dir: str | Path, cfg: SFTConfig | None = None) -> Path:
    """Fine-tune ``model_path`` on ``examples`` ({"prompt": str | chat messages, "response": str}) with Ray
    Train; returns ``out_dir``, a Hugging Face checkpoint. ``out_dir`` must be on storage rank 0 can write."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    cfg = cfg or SFTConfig()
    if not examples:
        raise ValueError("SFT needs at least one example")
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    rows = [{"prompt": _render(tokenizer, e["prompt"]), "response": e["response"]} for e in examples]
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"sft": cfg.model_dump(), "model_path": str(model_path), "out_dir": str(out_dir),
                           "total_steps": cfg.epochs * math.ceil(len(rows) / (cfg.batch_size * cfg.workers))},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"sft-{out_dir.name}", storage_path=str(out_dir.parent / "ray_train")),
        datasets={"train": ray.data.from_items(rows)},
    )
    trainer.fit()
    if not (out_dir / "config.json").exists():
        raise RuntimeError(f"SFT finished without writing {out_dir}")
    history = json.loads((out_dir / METRICS_FILE).read_text())["history"]
    log.info("SFT finished: %s (%d examples; mean loss by epoch %s)", out_dir, len(rows),
             ", ".join(f"{h['loss']:.4f}" for h in history))
    return out_dir
