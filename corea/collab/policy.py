"""The stepwise routing policy: a small MLP on step features -> P(call the LLM for this step).

Features of a step (all from the SLM's draft and the trace so far): min, mean, first and geometric-mean token
probability of the draft, step index / 8, prompt + prefix tokens / 128, whether the LLM wrote the previous step,
draft tokens / 32.

Training is REINFORCE over whole traces: R = correct - lambda * cost / cost(LLM-only), baseline the batch mean,
loss = -mean_e[(R_e - b) * sum_t log pi(a_t | f_t)] (a_t = 1: the LLM wrote step t), Adam.
The threshold on P(call LLM) is then chosen on a calibration split (``corea.selection.select_*``).
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from corea.selection import select_budget, select_max_drop

N_FEATURES = 8


def step_features(token_probs: Sequence[float], step: int, prompt_tokens: int, prev_llm: bool) -> np.ndarray:
    p = np.clip(np.asarray(list(token_probs) or [0.0], dtype=float), 1e-12, 1.0)
    return np.array([p.min(), p.mean(), p[0], float(np.exp(np.log(p).mean())), step / 8.0, prompt_tokens / 128.0,
                     float(prev_llm), len(token_probs) / 32.0], dtype=np.float32)


class StepPolicy:
    """MLP N_FEATURES -> hidden (tanh) -> 1 (sigmoid)."""

    def __init__(self, hidden: int = 16, seed: int = 0) -> None:
        import torch

        torch.manual_seed(seed)
        self.hidden = hidden
        self.net = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def logits(self, features):
        import torch

        return self.net(torch.as_tensor(np.asarray(features, dtype=np.float32))).squeeze(-1)

    def prob(self, features: np.ndarray) -> float:
        import torch

        with torch.no_grad():
            return float(torch.sigmoid(self.logits(features)))

    def to_json(self) -> str:
        return json.dumps({"hidden": self.hidden,
                           "state": {k: v.tolist() for k, v in self.net.state_dict().items()}})

    @classmethod
    def from_json(cls, text: str) -> "StepPolicy":
        import torch

        d = json.loads(text)
        policy = cls(d["hidden"])
        policy.net.load_state_dict({k: torch.tensor(v) for k, v in d["state"].items()})
        return policy


def reward(correct: bool, relative_cost: float, lam: float) -> float:
    """correct - lambda * cost / cost(LLM-only)."""
    return float(correct) - lam * float(relative_cost)


def reinforce_step(policy: StepPolicy, optimizer, episodes: Sequence[tuple[list, float]]) -> float:
    """One REINFORCE update from ``episodes`` = [(decisions [(features, action)], reward)]; returns the loss."""
    import torch

    rewards = torch.tensor([r for _, r in episodes], dtype=torch.float32)
    adv = rewards - rewards.mean()
    terms = []
    for (decisions, _), a in zip(episodes, adv):
        if not decisions:
            continue
        feats = np.stack([f for f, _ in decisions])
        actions = torch.tensor([float(x) for _, x in decisions])
        logp = -torch.nn.functional.binary_cross_entropy_with_logits(policy.logits(feats).reshape(-1), actions,
                                                                      reduction="sum")
        terms.append(a * logp)
    if not terms:
        return 0.0
    loss = -torch.stack(terms).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def calibrate_threshold(taus, pass_at_1, relative_cost, llm_pass_at_1: float, max_drop: float | None = None,
                        budget: float | None = None) -> float | None:
    """tau for a target on a calibration sweep: the cheapest tau within ``max_drop`` of the LLM's pass@1, or the
    most accurate tau within a relative-cost ``budget`` (exactly one of the two)."""
    if (max_drop is None) == (budget is None):
        raise ValueError("give exactly one of max_drop and budget")
    if max_drop is not None:
        return select_max_drop(taus, pass_at_1, relative_cost, llm_pass_at_1, max_drop)
    return select_budget(taus, pass_at_1, relative_cost, budget)
