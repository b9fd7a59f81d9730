"""The Probe baseline (RLVR-SLM-Probe): an MLP on the SLM's mean-pooled last-layer hidden states.

Features: the SLM's forward pass over prompt (chat template) + its own response; h = mean over the sequence's
tokens of the last layer's hidden states (after the final norm). Probe: Linear(d, 2048) - ReLU - Linear(2048,
1024) - ReLU - Linear(1024, 1) - sigmoid, trained with binary cross-entropy on the SLM's correctness over the
training questions, split 9:1 by question (train / validation); the epoch of lowest validation loss is kept.
Each worker reads its shard of the features into memory once and shuffles it every epoch.
Training runs on Ray Train (``TorchTrainer``); features come from a Ray Data actor pool (``HiddenFeatures``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def build_probe(input_dim: int, hidden: tuple[int, int] = (2048, 1024)):
    """The probe's logit network (apply a sigmoid for the probability)."""
    import torch.nn as nn

    return nn.Sequential(nn.Linear(input_dim, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
                         nn.Linear(hidden[1], 1))


def load_probe(path: str | Path):
    """(network in eval mode, saved metadata) from a file written by :func:`train_probe`."""
    import torch

    saved = torch.load(str(path), map_location="cpu", weights_only=False)
    net = build_probe(saved["input_dim"], tuple(saved["hidden"]))
    net.load_state_dict(saved["state_dict"])
    return net.eval(), {k: v for k, v in saved.items() if k != "state_dict"}


class HiddenFeatures:
    """Ray Data callable class: mean-pooled last-layer hidden states of prompt + response, and optionally the
    probe's probability on them.

    Input columns: ``messages`` (JSON chat), ``response``, ``correct``. Output: without ``probe_path``, a
    ``features`` [B, d] float32 tensor column and ``label`` (correctness); with it, ``probe_confidence``.
    """

    def __init__(self, model_path: str, max_length: int = 8192, probe_path: str | None = None,
                 device: str | None = None, num_threads: int = 1):
        import torch

        from corea.models import load_model_and_tokenizer

        torch.set_num_threads(max(1, num_threads))
        self.model, self.tokenizer = load_model_and_tokenizer(model_path, device=device)
        self.max_length = max_length
        self.probe = load_probe(probe_path)[0].to(self.model.device) if probe_path else None

    def _ids(self, messages: str, response: str) -> list[int]:
        from corea.engines.base import encode_prompt

        prompt = encode_prompt(self.tokenizer, json.loads(messages))
        answer = self.tokenizer(str(response or ""), add_special_tokens=False)["input_ids"]
        return (prompt + list(answer))[: self.max_length]

    def __call__(self, batch: pd.DataFrame) -> dict[str, Any]:
        import torch

        seqs = [self._ids(m, r) for m, r in zip(batch["messages"], batch["response"])]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # right padding: positions start at 0 for every row
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        dev = self.model.device
        with torch.inference_mode():
            hidden = self.model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
            m = mask.to(dev).unsqueeze(-1).to(hidden.dtype)
            pooled = ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float()
            if self.probe is not None:
                prob = torch.sigmoid(self.probe(pooled)).squeeze(-1).cpu().numpy()
                out = batch.drop(columns=["messages"]).copy()
                out["probe_confidence"] = prob.astype(float)
                return out
        return {"features": pooled.cpu().numpy().astype(np.float32),
                "label": batch["correct"].to_numpy().astype(np.float32),
                "val": batch["val"].to_numpy().astype(bool)}


def _load_shard(shard, batch_size: int, device) -> tuple:
    """(features [N, d], labels [N]) of a worker's dataset shard, read once into memory."""
    import torch

    xs, ys = [], []
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
        xs.append(batch["features"].float())
        ys.append(batch["label"].float())
    if not xs:
        return torch.zeros((0, 0), device=device), torch.zeros(0, device=device)
    return torch.cat(xs), torch.cat(ys)


def _train_loop(config: dict) -> None:
    """Ray Train worker: AdamW on BCE, shards read once, shuffled each epoch; keeps the best validation epoch."""
    import torch
    import torch.distributed as dist
    from ray import train
    from ray.train.torch import get_device, prepare_model

    from corea.evaluate.tables import auroc_fast

    torch.manual_seed(config["seed"])
    device = get_device()
    model = prepare_model(build_probe(config["input_dim"], tuple(config["hidden"])))
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    x_train, y_train = _load_shard(train.get_dataset_shard("train"), 4096, device)
    x_val, y_val = _load_shard(train.get_dataset_shard("val"), 4096, device)
    best = {"val_loss": float("inf"), "epoch": 0, "state_dict": None}
    history = []
    bs, gen = config["batch_size"], torch.Generator().manual_seed(config["seed"])
    for epoch in range(1, config["epochs"] + 1):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(y_train), generator=gen).split(bs):
            logits = model(x_train[idx.to(device)]).squeeze(-1)
            loss = loss_fn(logits, y_train[idx.to(device)])
            opt.zero_grad()
            (loss / logits.numel()).backward()
            opt.step()
            total += float(loss)
        model.eval()
        with torch.no_grad():
            logits = model(x_val).squeeze(-1) if len(y_val) else torch.zeros(0, device=device)
            sums = torch.stack([loss_fn(logits, y_val), torch.tensor(float(len(y_val)), device=device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        val_loss = float(sums[0] / sums[1].clamp(min=1))
        val_auroc = auroc_fast(torch.sigmoid(logits).cpu().numpy(), y_val.cpu().numpy())
        if val_loss < best["val_loss"] or best["state_dict"] is None or float(sums[1]) == 0:  # no val: keep last
            module = model.module if hasattr(model, "module") else model
            best = {"val_loss": val_loss, "val_auroc": val_auroc, "epoch": epoch,
                    "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}}
        history.append({"epoch": epoch, "train_loss": total / max(len(y_train), 1), "val_loss": val_loss,
                        "val_auroc": val_auroc})  # not train.report: see corea.train.sft._train_loop
    if train.get_context().get_world_rank() == 0:
        out = Path(config["out_path"])
        tmp = out.with_name(f".{out.name}.tmp")
        torch.save({**best, "history": history, "input_dim": config["input_dim"], "hidden": list(config["hidden"]),
                    "n_train": int(len(y_train)), "n_val": int(len(y_val))}, tmp)
        tmp.replace(out)


def feature_dataset(frame: pd.DataFrame, messages: pd.Series, model_path: str, cfg, val_mask: np.ndarray):
    """A Ray Dataset of (features, label, val) for the training records in ``frame``."""
    import ray.data

    rows = frame.assign(messages=messages.to_numpy(), val=val_mask)[["messages", "response", "correct", "val"]]
    return ray.data.from_pandas(rows).map_batches(
        HiddenFeatures, fn_constructor_kwargs={"model_path": model_path, "max_length": cfg.max_length},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=cfg.feature_batch_size, batch_format="pandas",
        num_gpus=cfg.num_gpus or None, num_cpus=1)


def train_probe(features, cfg, out_path: str | Path, seed: int = 0) -> Path:
    """Train the probe with a ``TorchTrainer`` on ``features`` (a dataset from :func:`feature_dataset`)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_path = Path(out_path).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    features = features.materialize()
    input_dim = int(np.asarray(features.take(1)[0]["features"]).shape[-1])
    from ray.data.expressions import col

    train_ds = features.filter(expr=col("val") == False)  # noqa: E712 (an Arrow predicate, not a Python test)
    val_ds = features.filter(expr=col("val") == True)  # noqa: E712
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"input_dim": input_dim, "hidden": list(cfg.hidden), "lr": cfg.lr,
                           "weight_decay": cfg.weight_decay, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                           "seed": seed, "out_path": str(out_path)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=f"probe-{out_path.stem}", storage_path=str(out_path.parent / "ray_train")),
        datasets={"train": train_ds, "val": val_ds},
    )
    trainer.fit()
    if not out_path.exists():
        raise RuntimeError(f"probe training finished without writing {out_path}")
    shutil.rmtree(out_path.parent / "ray_train", ignore_errors=True)
    return out_path


def score_records(frame: pd.DataFrame, messages: pd.Series, model_path: str, probe_path: str | Path, cfg) -> pd.Series:
    """``probe_confidence`` for every row of ``frame`` (records of the probed SLM), in ``frame``'s order."""
    import ray.data

    rows = frame.assign(messages=messages.to_numpy(), _row=np.arange(len(frame)))
    rows = rows[["messages", "response", "correct", "_row"]]
    ds = ray.data.from_pandas(rows).map_batches(
        HiddenFeatures, fn_constructor_kwargs={"model_path": model_path, "max_length": cfg.max_length,
                                               "probe_path": str(probe_path)},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=cfg.feature_batch_size, batch_format="pandas",
        num_gpus=cfg.num_gpus or None, num_cpus=1)
    out = ds.to_pandas().sort_values("_row")
    return pd.Series(out["probe_confidence"].to_numpy(float), index=frame.index)
