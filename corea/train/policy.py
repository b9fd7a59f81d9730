"""The policy under training (one DeepSpeed rank) and the frozen reference model.

Both are plain classes; ``corea.train.actors`` runs them as Ray actors. DeepSpeed uses its CPU accelerator
(gloo, fp32) where no GPU is visible and CUDA (NCCL, bf16 if configured) otherwise. Precision: bf16 weights
loaded as bf16 (under ``deepspeed.zero.Init`` for ZeRO-3, so no rank holds the full model), fp32 master weights
in the optimizer, gradients accumulated in fp32 (see ``corea.train.zero_params``).

Under ZeRO-3 ``named_full_params``, ``state_dict``, ``export_hf`` and ``save`` are collectives: every rank
calls them, in the same order.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from corea import storage
from corea.models import load_model_and_tokenizer
from corea.train.config import OptimConfig
from corea.train.grpo import grpo_loss
from corea.train.sequences import RolloutSequence, pack, repack, score, unpack
from corea.train.zero_params import ds_config, export_hf, iter_full_params

log = logging.getLogger(__name__)


def _use_cuda() -> bool:
    return torch.cuda.is_available()


def _micro_batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _max_gap(logprobs: Sequence[Sequence[float]], sequences: Sequence[RolloutSequence]) -> float:
    """max |log pi_trainer - log pi_rollout| over response tokens: ~0 when the rollout used the current weights."""
    gaps = [
        abs(a - b)
        for lp, s in zip(logprobs, sequences)
        if s.rollout_logprobs is not None
        for a, b in zip(lp, s.rollout_logprobs)
    ]
    return max(gaps, default=float("nan"))


class ReferenceModel:
    """Frozen initial weights; per-token log-probabilities of response tokens."""

    def __init__(self, model_path: str, micro_batch_size: int = 8, device: str | None = None):
        self.device = device or ("cuda" if _use_cuda() else "cpu")
        dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.model, _ = load_model_and_tokenizer(model_path, dtype, self.device)
        self.pad_id = self.model.config.pad_token_id or 0
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def logprobs(self, sequences: Sequence[RolloutSequence]) -> list[list[float]]:
        out: list[list[float]] = []
        for chunk in _micro_batches(list(sequences), self.micro_batch_size):
            batch = pack(chunk, self.pad_id).to(self.device)
            logp, _ = score(self.model, batch)
            out.extend(unpack(logp.float(), batch))
        return out


class Policy:
    """One data-parallel rank of the policy: DeepSpeed engine, AdamW, GRPO update."""

    def __init__(
        self,
        model_path: str,
        optim: OptimConfig,
        sequences_per_update: int,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
        seed: int = 0,
    ):
        cuda = _use_cuda()
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
            WORLD_SIZE=str(world_size), LOCAL_RANK="0",
        )
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        torch.manual_seed(seed + rank)
        self.optim, self.rank, self.world_size = optim, rank, world_size
        if sequences_per_update % optim.micro_batch_size:
            raise ValueError(f"{sequences_per_update} sequences per update is not a multiple of micro_batch_size")
        self.sequences_per_update = sequences_per_update  # on this rank
        config = self._ds_config()
        dtype = "bfloat16" if optim.precision == "bf16" else "float32"
        # ZeRO 0-2: loaded on the CPU, DeepSpeed moves it; ZeRO-3: built partitioned under deepspeed.zero.Init
        model, _ = load_model_and_tokenizer(model_path, dtype, "cpu", deepspeed_config=config)
        if optim.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.pad_id = model.config.pad_token_id or 0
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.device = self.engine.device

    def _ds_config(self) -> dict:
        o = self.optim
        return ds_config(o.micro_batch_size, self.sequences_per_update // o.micro_batch_size, o.zero_stage,
                         o.precision, o.max_grad_norm)

    @property
    def zero3(self) -> bool:
        return self.engine.zero_optimization_partition_weights()

    @torch.no_grad()
    def logprobs(self, sequences: Sequence[RolloutSequence]) -> list[list[float]]:
        self.engine.eval()
        out: list[list[float]] = []
        for chunk in _micro_batches(list(sequences), self.optim.micro_batch_size):
            batch = pack(chunk, self.pad_id).to(self.device)
            logp, _ = score(self.engine, batch)
            out.extend(unpack(logp.float(), batch))
        return out

    def train(self, sequences: Sequence[RolloutSequence], ref_logprobs: Sequence[Sequence[float]] | None,
              behaviour: bool = False) -> dict[str, float]:
        """GRPO on this rank's share of one rollout step: one optimizer step per ``sequences_per_update``
        sequences, gradients accumulated over micro-batches (DeepSpeed averages them, and over ranks).
        The old log-probs of the PPO ratio are those of the weights at entry; with ``behaviour`` (a batch
        sampled with older weights) they are the rollout's own, or, with ``optim.importance_cap``, the weights'
        at entry with the truncated importance weight against the rollout's (see ``grpo_loss``)."""
        sequences = list(sequences)
        if not sequences or len(sequences) % self.sequences_per_update:
            raise ValueError(f"{len(sequences)} sequences do not split into updates of {self.sequences_per_update}")
        cap = self.optim.importance_cap if behaviour else None
        use_rollout = behaviour and cap is None
        # The first update runs on unchanged weights, so its old log-probs are its own, detached; only the
        # sequences of later updates need a no-grad pass before the first optimizer step.
        first = len(sequences) if use_rollout else self.sequences_per_update
        old: list[list[float] | None] = [None] * first + self.logprobs(sequences[first:])
        self.engine.train()
        totals: dict[str, float] = {}
        chunks = list(_micro_batches(list(range(len(sequences))), self.optim.micro_batch_size))
        for idx in chunks:
            batch = pack([sequences[i] for i in idx], self.pad_id).to(self.device)
            # entropy_coef == 0: the entropy is only logged, so its full-vocabulary softmax stays out of the graph
            logp, entropy = score(self.engine, batch, with_entropy=True, entropy_grad=self.optim.entropy_coef > 0)
            behaviour_t = repack([sequences[i].rollout_logprobs for i in idx], batch).to(self.device) if behaviour else None
            if use_rollout:
                old_t = behaviour_t
                for i, values in zip(idx, unpack(logp.detach().float(), batch)):
                    old[i] = values  # for the rollout log-prob gap below
            elif idx[0] < first:
                old_t = logp.detach()
                for i, values in zip(idx, unpack(old_t.float(), batch)):
                    old[i] = values
            else:
                old_t = repack([old[i] for i in idx], batch).to(self.device)
            ref_t = repack([ref_logprobs[i] for i in idx], batch).to(self.device) if ref_logprobs else None
            adv = torch.tensor([sequences[i].advantage for i in idx], device=self.device)
            terms = grpo_loss(
                logp, old_t, ref_t, adv, batch.mask, entropy,
                clip_eps=self.optim.clip_eps, kl_coef=self.optim.kl_coef, entropy_coef=self.optim.entropy_coef,
                loss_agg=self.optim.loss_agg, norm_tokens=self.optim.loss_norm_tokens,
                behaviour_logp=behaviour_t, importance_cap=cap,
            )
            self.engine.backward(terms.loss)
            self.engine.step()  # applies the optimizer only at the accumulation boundary
            for name in ("loss", "policy_loss", "kl", "entropy", "clip_fraction", "ratio_mean", "importance_weight_mean"):
                if getattr(terms, name) is not None:
                    totals[name] = totals.get(name, 0.0) + float(getattr(terms, name).detach())
        totals = {k: v / len(chunks) for k, v in totals.items()}
        totals["rollout_logprob_gap"] = _max_gap(old, sequences)
        totals["optimizer_steps"] = float(self.engine.global_steps)
        return totals

    def _module(self):
        return self.engine.module

    def named_full_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(Hugging Face name, full tensor)`` per parameter, one at a time, in module order (the names vLLM's
        ``load_weights`` expects). Under ZeRO-3 each one is gathered on every rank: ALL ranks iterate this in
        lockstep, to the end; the CUDA device is synchronized before a gather is released. A tensor is
        valid until the next item (clone to keep). Tied parameters come once."""
        return iter_full_params(self._module(), self.zero3)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full parameters as fp32 CPU copies under their Hugging Face names, on rank 0; ``None`` on other ranks.

        Under ZeRO-3 a collective (all ranks call it); under ZeRO 0-2 rank 0 may call it alone."""
        keep = self.rank == 0
        out = {name: t.detach().to("cpu", torch.float32).clone() for name, t in self.named_full_params() if keep}
        return out if keep else None

    def export_hf(self, folder: str | Path) -> Path | None:
        """All ranks call this; rank 0 writes a Hugging Face folder (config + safetensors in the training dtype)
        from the consolidated state dict, atomically; other ranks write nothing. Returns the folder on rank 0."""
        return export_hf(self.engine, folder, self.rank)

    def save(self, folder: str | Path, tag: str = "state") -> None:
        """DeepSpeed state under ``folder/deepspeed`` and Hugging Face weights under ``folder/hf`` (``export_hf``).
        All ranks call it (collective); only rank 0 writes the Hugging Face folder. ``folder`` may be a URI: each
        rank writes to local scratch and uploads its own files (``corea.storage.staged``)."""
        with storage.staged(folder) as local:
            self.engine.save_checkpoint(str(local / "deepspeed"), tag=tag)
            self.export_hf(local / "hf")

    def load(self, folder: str | Path, tag: str = "state") -> None:
        """Restore weights and optimizer state written by ``save``."""
        local = storage.local_path(storage.join(folder, "deepspeed"))  # a URI: copied once per node
        path, _ = self.engine.load_checkpoint(str(local), tag=tag, load_optimizer_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {folder}/deepspeed")
