"""Packing rollouts into padded tensors and scoring them with a causal LM.

A rollout sequence is prompt token ids followed by response token ids. Packed right-padded, position t of
``targets`` is the token predicted from positions <= t, and ``mask`` is 1 where that token is a response token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from corea.train.grpo import entropy_from_logits, token_logprobs


@dataclass
class RolloutSequence:
    """One response with what training needs of it."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float = 0.0
    rollout_logprobs: list[float] | None = None  # as reported by the rollout engine


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, L) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, L - 1) input_ids shifted left
    mask: torch.Tensor  # (B, L - 1) 1 on response targets

    def to(self, device) -> "PackedBatch":
        return PackedBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.targets, self.mask)))


def pack(sequences: Sequence[RolloutSequence], pad_id: int) -> PackedBatch:
    """Right-pad prompt + response of every sequence to the longest one."""
    if not sequences:
        raise ValueError("cannot pack an empty batch")
    length = max(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    mask = torch.zeros((len(sequences), length - 1), dtype=torch.float32)
    for i, s in enumerate(sequences):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[i, : p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        attention[i, : p + r] = 1
        mask[i, p - 1 : p + r - 1] = 1.0  # targets p .. p+r-1 are the response tokens
    return PackedBatch(ids, attention, ids[:, 1:].clone(), mask)


def score(
    model, batch: PackedBatch, with_entropy: bool = False, entropy_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-target log-probabilities (B, L-1), and per-position entropies when asked, of ``batch`` under ``model``.

    ``entropy_grad=False``: the entropy is computed without autograd (a logged value only), so its
    full-vocabulary softmax is not kept for the backward pass."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = token_logprobs(logits, batch.targets)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits)
    return logp, entropy


def unpack(values: torch.Tensor, batch: PackedBatch) -> list[list[float]]:
    """Per-sequence lists of the values at response positions."""
    return [row[m.bool()].tolist() for row, m in zip(values, batch.mask)]


def repack(per_sequence: Sequence[Sequence[float]], batch: PackedBatch) -> torch.Tensor:
    """Inverse of ``unpack``: place per-sequence response values into a (B, L-1) tensor (0 elsewhere)."""
    out = torch.zeros_like(batch.mask)
    for i, values in enumerate(per_sequence):
        out[i, batch.mask[i].bool()] = torch.tensor(list(values), dtype=out.dtype)
    return out
