"""The stepwise routing policy: a small MLP on step features -> P(call the LLM for this step).

Features of a step (all from the SLM's draft and the trace so far, ``step_features``): min, mean, first and
geometric-mean token probability of the draft, step index / 8, prompt + prefix tokens / 128, whether the LLM
wrote the previous step, draft tokens / 32. A policy may derive more inputs from them (``DERIVED``):
``log_min`` = max(log p_min, -20) / 10, and ``posterior`` = STEER's mixture posterior of p_min (the policy then
carries the mixture).

Objective (the method's constrained problem in Lagrangian form): maximize E[R] with
    R = correct - lambda * C / C_LLM-only,
C the trace's token cost (every SLM draft and LLM step, ``corea.collab.trace``); a larger lambda buys a cheaper
policy, so a sweep of lambda traces the accuracy-cost frontier. Per step t of a trace (c_t: the cost of step t's
calls / C_LLM-only) the return to go is
    G_t = correct - lambda * sum_{u >= t} c_u
(the cost already spent does not depend on a_t). With K samples of one question the baseline of sample i at
step t is the leave-one-out mean b_it = (sum_j G_jt - G_it) / (K - 1), G_jt = correct_j past sample j's end; it
does not depend on sample i's actions, so the estimate stays unbiased, and it removes the question's difficulty
from the signal (a hard question no longer pushes down every action taken on it). The update is
    loss = -mean_i sum_t (G_it - b_it) log pi(a_it | f_it)          (a = 1: the LLM wrote step t), Adam.
The threshold on P(call LLM) is then chosen on a calibration split (``corea.selection.select_*``).
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from corea.collab.mixture import StepMixture
from corea.selection import select_budget, select_max_drop

N_FEATURES = 8
DERIVED = ("log_min", "posterior")


def step_features(token_probs: Sequence[float], step: int, prompt_tokens: int, prev_llm: bool) -> np.ndarray:
    p = np.clip(np.asarray(list(token_probs) or [0.0], dtype=float), 1e-12, 1.0)
    return np.array([p.min(), p.mean(), p[0], float(np.exp(np.log(p).mean())), step / 8.0, prompt_tokens / 128.0,
                     float(prev_llm), len(token_probs) / 32.0], dtype=np.float32)


def derive(features: np.ndarray, derived: Sequence[str] = (), mixture: StepMixture | None = None) -> np.ndarray:
    """``features`` [..., N_FEATURES] with the ``derived`` inputs appended (see the module docstring)."""
    f = np.asarray(features, dtype=np.float32)
    extra = []
    for name in derived:
        if name == "log_min":
            extra.append(np.maximum(np.log(np.clip(f[..., 0], 1e-12, 1.0)), -20.0) / 10.0)
        elif name == "posterior":
            if mixture is None:
                raise ValueError("the posterior input needs a mixture")
            extra.append(np.asarray(mixture.posterior(f[..., 0].astype(float)), dtype=np.float32))
        else:
            raise ValueError(f"derived inputs are {DERIVED}, got {name!r}")
    return np.concatenate([f, np.stack(extra, axis=-1).astype(np.float32)], axis=-1) if extra else f


class StepPolicy:
    """MLP (N_FEATURES + derived inputs, standardized) -> hidden (tanh) -> 1 (sigmoid).

    Inputs x = (derive(f) - mean) / std with ``mean`` / ``std`` fixed before training (``standardize``) from
    the training split's step features (identity until then), so that a small difference in a probability
    near 1 is not lost to the scale of the other inputs."""

    def __init__(self, hidden: int = 16, seed: int = 0, derived: Sequence[str] = (),
                 mixture: StepMixture | None = None) -> None:
        import torch

        if "posterior" in derived and mixture is None:
            raise ValueError("the posterior input needs a mixture")
        torch.manual_seed(seed)
        self.hidden, self.derived, self.mixture = hidden, tuple(derived), mixture
        n_in = N_FEATURES + len(self.derived)
        self.net = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        self.mean, self.std = np.zeros(n_in, dtype=np.float32), np.ones(n_in, dtype=np.float32)
        self._numpy: list[np.ndarray] | None = None

    def standardize(self, features: np.ndarray, min_std: float = 0.05) -> None:
        """Fix the input scaling from step features [n, N_FEATURES]: mean and max(std, ``min_std``) per input."""
        x = self.inputs_raw(np.asarray(features, dtype=np.float32).reshape(-1, N_FEATURES))
        self.mean, self.std = x.mean(axis=0).astype(np.float32), np.maximum(x.std(axis=0), min_std).astype(np.float32)
        self._numpy = None

    def inputs_raw(self, features) -> np.ndarray:
        return derive(features, self.derived, self.mixture)

    def inputs(self, features) -> np.ndarray:
        return (self.inputs_raw(features) - self.mean) / self.std

    def logits(self, features):
        import torch

        self._numpy = None  # a training step may follow: the numpy copy of the weights is refreshed on demand
        return self.net(torch.as_tensor(self.inputs(features))).squeeze(-1)

    def prob(self, features: np.ndarray) -> float:
        """P(call the LLM) for one step (numpy forward pass: one step per call while a trace runs)."""
        if self._numpy is None:
            self._numpy = [p.detach().numpy().astype(np.float64).copy() for p in self.net.parameters()]
        w1, b1, w2, b2 = self._numpy
        z = float((np.tanh(self.inputs(features).astype(np.float64) @ w1.T + b1) @ w2.T + b2).reshape(-1)[0])
        return float(1.0 / (1.0 + np.exp(-z)))

    def to_json(self) -> str:
        return json.dumps({"hidden": self.hidden, "derived": list(self.derived),
                           "mixture": json.loads(self.mixture.to_json()) if self.mixture else None,
                           "mean": self.mean.tolist(), "std": self.std.tolist(),
                           "state": {k: v.tolist() for k, v in self.net.state_dict().items()}})

    @classmethod
    def from_json(cls, text: str) -> "StepPolicy":
        import torch

        d = json.loads(text)
        mixture = StepMixture.from_json(json.dumps(d["mixture"])) if d.get("mixture") else None
        policy = cls(d["hidden"], derived=d.get("derived", ()), mixture=mixture)
        policy.net.load_state_dict({k: torch.tensor(v) for k, v in d["state"].items()})
        if "mean" in d:
            policy.mean, policy.std = (np.asarray(d[k], dtype=np.float32) for k in ("mean", "std"))
        return policy


def reward(correct: bool, relative_cost: float, lam: float) -> float:
    """correct - lambda * cost / cost(LLM-only)."""
    return float(correct) - lam * float(relative_cost)


def returns_to_go(correct: float, step_costs: Sequence[float], lam: float) -> np.ndarray:
    """G_t = correct - lambda * sum_{u >= t} c_u for each step t (c_u: relative cost of step u)."""
    c = np.asarray(step_costs, dtype=float)
    return float(correct) - lam * np.cumsum(c[::-1])[::-1]


def leave_one_out_advantages(returns: Sequence[np.ndarray], finals: Sequence[float]) -> list[np.ndarray]:
    """A_it = G_it - (sum_{j != i} G_jt) / (K - 1) over K samples of one question; past sample j's last step
    G_jt = ``finals[j]`` (its correctness for returns to go, R_j for whole-trace returns). K = 1: A = G."""
    k = len(returns)
    if k == 0:
        return []
    width = max((len(g) for g in returns), default=0)
    grid = np.array([np.concatenate([g, np.full(width - len(g), f)]) for g, f in zip(returns, finals)], dtype=float)
    if k == 1:
        return [np.asarray(returns[0], dtype=float)]
    base = (grid.sum(axis=0, keepdims=True) - grid) / (k - 1)
    return [(grid[i] - base[i])[: len(g)] for i, g in enumerate(returns)]


def policy_gradient_step(policy: StepPolicy, optimizer, decisions: Sequence[list], advantages: Sequence,
                         entropy: float = 0.0) -> float:
    """loss = -mean_i sum_t [A_it log pi(a_it | f_it) + beta H(pi(. | f_it))] over the traces with decisions
    (beta = ``entropy``: a bonus that keeps the policy exploring until the advantages say otherwise); one
    optimizer step; the loss."""
    import torch

    terms = []
    for dec, adv in zip(decisions, advantages):
        if not dec:
            continue
        feats = np.stack([f for f, _ in dec])
        actions = torch.tensor([float(x) for _, x in dec])
        z = policy.logits(feats).reshape(-1)
        logp = -torch.nn.functional.binary_cross_entropy_with_logits(z, actions, reduction="none")
        a = torch.tensor(np.broadcast_to(np.asarray(adv, dtype=np.float32), tuple(logp.shape)).copy())
        term = (a * logp).sum()
        if entropy:  # H = -(p log p + (1 - p) log(1 - p)), p = sigmoid(z)
            ls = torch.nn.functional.logsigmoid
            p = torch.sigmoid(z)
            term = term - entropy * (p * ls(z) + (1 - p) * ls(-z)).sum()
        terms.append(term)
    if not terms:
        return 0.0
    loss = -torch.stack(terms).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    policy._numpy = None
    return float(loss.detach())


def reinforce_step(policy: StepPolicy, optimizer, episodes: Sequence[tuple[list, float]]) -> float:
    """One REINFORCE update from ``episodes`` = [(decisions [(features, action)], reward)] with the batch-mean
    baseline (A = R - mean R for every step of a trace); returns the loss."""
    rewards = np.array([r for _, r in episodes], dtype=float)
    adv = rewards - rewards.mean() if len(rewards) else rewards
    return policy_gradient_step(policy, optimizer, [d for d, _ in episodes], list(adv))


def calibrate_threshold(taus, pass_at_1, relative_cost, llm_pass_at_1: float, max_drop: float | None = None,
                        budget: float | None = None) -> float | None:
    """tau for a target on a calibration sweep: the cheapest tau within ``max_drop`` of the LLM's pass@1, or the
    most accurate tau within a relative-cost ``budget`` (exactly one of the two)."""
    if (max_drop is None) == (budget is None):
        raise ValueError("give exactly one of max_drop and budget")
    if max_drop is not None:
        return select_max_drop(taus, pass_at_1, relative_cost, llm_pass_at_1, max_drop)
    return select_budget(taus, pass_at_1, relative_cost, budget)
