"""GRPO maths on tensors: group advantages, PPO-clip loss, k3 KL, entropy.

Shapes: B sequences of T response tokens; ``mask`` is 1 on response tokens and 0 on padding. Every loss
is a token-level mean over the masked tokens of the batch (each token weighs the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + eps) within each consecutive group of ``group_size``.

    std is the population standard deviation; a group whose rewards are all equal gets A = 0."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size).to(torch.float64)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1).to(rewards.dtype)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(values * mask) / max(sum(mask), 1)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(d) - d - 1 with d = log pi_ref - log pi; always >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy -sum_v p_v log p_v of softmax(logits), in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[t] for each target token; logits (B, T, V), tokens (B, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass
class LossTerms:
    loss: torch.Tensor  # what is back-propagated
    policy_loss: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    clip_fraction: torch.Tensor
    ratio_mean: torch.Tensor


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
) -> LossTerms:
    """loss = mean_t[-min(rho A, clip(rho, 1-eps, 1+eps) A)] + kl_coef * mean_t[k3] - entropy_coef * mean_t[H]

    with rho = exp(logp - old_logp) per token and A the sequence's advantage broadcast to its tokens."""
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(-1).expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    policy_loss = masked_mean(-torch.min(unclipped, clipped), mask)
    clip_fraction = masked_mean((unclipped > clipped).to(logp.dtype), mask).detach()
    zero = logp.new_zeros(())
    kl = masked_mean(k3_kl(logp, ref_logp), mask) if ref_logp is not None else zero
    ent = masked_mean(entropy, mask) if entropy is not None else zero
    loss = policy_loss + kl_coef * kl - entropy_coef * ent
    return LossTerms(loss, policy_loss.detach(), kl.detach(), ent.detach(), clip_fraction, masked_mean(ratio, mask).detach())
