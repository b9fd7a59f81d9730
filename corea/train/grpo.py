"""GRPO maths on tensors: group advantages, PPO-clip loss, k3 KL, entropy.

Shapes: B sequences of T response tokens; ``mask`` is 1 on response tokens and 0 on padding. Per-token loss
terms are reduced to a scalar by ``aggregate`` (``LOSS_AGGREGATIONS``): a token mean by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, std_normalize: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + eps) within each consecutive group of ``group_size``; with
    ``std_normalize=False`` (Dr. GRPO) A_i = r_i - mean_g r.

    std is the population standard deviation; a group whose rewards are all equal gets A = 0."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size).to(torch.float64)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if std_normalize:
        centred = centred / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.view(-1).to(rewards.dtype)


def zero_std_groups(rewards: Sequence[float], group_size: int) -> list[bool]:
    """Per consecutive group: True when all its rewards are equal (every advantage is 0, no policy gradient)."""
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    return [max(rewards[i : i + group_size]) == min(rewards[i : i + group_size]) for i in range(0, len(rewards), group_size)]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(values * mask) / max(sum(mask), 1)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: str = "token_mean", norm_tokens: int | None = None) -> torch.Tensor:
    """Reduce per-token values (B, T) over the masked tokens, with L_i = sum_t mask_it:

    - ``token_mean``: sum_i sum_t v_it / sum_i L_i (every token weighs the same; long answers weigh more);
    - ``seq_mean_token_mean``: (1/B) sum_i (sum_t v_it / L_i) (GRPO's original form: every sequence weighs the same);
    - ``seq_mean_token_sum_norm``: (1/B) sum_i sum_t v_it / N with a constant N = ``norm_tokens`` (Dr. GRPO;
      N is the maximum response length, so no length bias is introduced).
    A sequence with no masked token counts as L_i = 1 (its terms are 0)."""
    values = values * mask
    if how == "token_mean":
        return masked_mean(values, mask)
    if how == "seq_mean_token_mean":
        return (values.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)).mean()
    if how == "seq_mean_token_sum_norm":
        if not norm_tokens or norm_tokens < 1:
            raise ValueError("seq_mean_token_sum_norm needs norm_tokens >= 1 (the maximum response length)")
        return (values.sum(dim=-1) / norm_tokens).mean()
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, not {how!r}")


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
    importance_weight_mean: torch.Tensor | None = None  # mean truncated weight, when a cap is used


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
    loss_agg: str = "token_mean",
    norm_tokens: int | None = None,
    behaviour_logp: torch.Tensor | None = None,
    importance_cap: float | None = None,
) -> LossTerms:
    """loss = agg[-w min(rho A, clip(rho, 1-eps, 1+eps) A)] + kl_coef * agg[k3] - entropy_coef * agg[H]

    with rho = exp(logp - old_logp) per token, A the sequence's advantage broadcast to its tokens, ``agg`` the
    ``loss_agg`` reduction (see ``aggregate``) and w = 1, or with ``importance_cap`` c and the log-probs
    ``behaviour_logp`` the rollout engine sampled with, the truncated importance weight
    w = min(exp(old_logp - behaviour_logp), c), detached (TIS: it corrects for the gap between the sampling
    policy, possibly several updates old, and ``old_logp``)."""
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(-1).expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    token_loss = -torch.min(unclipped, clipped)
    weight_mean = None
    if importance_cap is not None:
        if behaviour_logp is None:
            raise ValueError("importance_cap needs the behaviour log-probs")
        weight = torch.exp(old_logp - behaviour_logp).clamp(max=importance_cap).detach()
        token_loss = token_loss * weight
        weight_mean = masked_mean(weight, mask)

    def agg(values: torch.Tensor) -> torch.Tensor:
        return aggregate(values, mask, loss_agg, norm_tokens)

    policy_loss = agg(token_loss)
    clip_fraction = masked_mean((unclipped > clipped).to(logp.dtype), mask).detach()
    zero = logp.new_zeros(())
    kl = agg(k3_kl(logp, ref_logp)) if ref_logp is not None else zero
    ent = agg(entropy) if entropy is not None else zero
    loss = policy_loss + kl_coef * kl - entropy_coef * ent
    return LossTerms(loss, policy_loss.detach(), kl.detach(), ent.detach(), clip_fraction,
                     masked_mean(ratio, mask).detach(), weight_mean)
