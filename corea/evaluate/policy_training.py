"""Training the stepwise routing policy by REINFORCE on a training split (the objective and the estimator are
stated in ``corea.collab.policy``), with a learning curve per iteration.

Each iteration runs every training question ``samples`` times through ``stepwise_policy`` with actions sampled
from Bernoulli(P(call LLM)), grades the answers and takes one Adam step. Advantages:
    baseline "batch": A_it = R_i - mean_batch R                       (every step of trace i)
    baseline "loo":   A_it = G_it - mean_{j != i, same question} G_jt  (``leave_one_out_advantages``)
with G_it = R_i ("trace" returns) or the return to go ("to_go"). Training stops after ``iterations``, or earlier
on a plateau: with window w, once at least ``min_iterations`` ran, when the mean reward of the last w iterations
exceeds that of the w before by less than ``plateau_tol``.

The learning curve's row per iteration: mean reward, pass@1, cost_rel (mean cost / mean LLM-only cost on the
same questions), llm_step_share (mean share of a trace's steps written by the LLM), the loss, the engine calls
it needed (with a generation cache most steps are already known) and its seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from corea.collab.policy import StepPolicy, leave_one_out_advantages, policy_gradient_step, returns_to_go
from corea.collab.strategies import Settings
from corea.collab.trace import CostModel, Trace
from corea.data import Record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingConfig:
    """How the policy is trained. The defaults are the cheap single-sample run of ``corea demo``."""

    lam: float = 0.3
    iterations: int = 12  # at most
    samples: int = 1  # sampled traces per question per iteration
    baseline: str = "batch"  # "batch" | "loo" (leave-one-out over the question's samples; needs samples >= 2)
    returns: str = "trace"  # "trace" (R on every step) | "to_go" (correct - lambda x cost of this step and later)
    lr: float = 0.02
    hidden: int = 16
    derived: tuple[str, ...] = ()  # extra inputs (``corea.collab.policy.DERIVED``); "posterior" needs a mixture
    plateau_window: int = 0  # 0: run every iteration
    plateau_tol: float = 0.005
    min_iterations: int = 0
    init_bias: float = -1.0  # the start: P(call LLM) ~ sigmoid(-1) = 0.27 everywhere
    entropy: float = 0.0  # entropy bonus beta (``corea.collab.policy.policy_gradient_step``)
    standardize: bool = True  # scale the inputs by the first iteration's step features
    seed: int = 0

    def __post_init__(self) -> None:
        if self.baseline not in ("batch", "loo"):
            raise ValueError(f"baseline must be 'batch' or 'loo', got {self.baseline!r}")
        if self.returns not in ("trace", "to_go"):
            raise ValueError(f"returns must be 'trace' or 'to_go', got {self.returns!r}")
        if self.baseline == "loo" and self.samples < 2:
            raise ValueError("the leave-one-out baseline needs samples >= 2")
        if self.iterations < 1 or self.samples < 1:
            raise ValueError("iterations and samples must be >= 1")


def step_costs(trace: Trace, model: CostModel) -> np.ndarray:
    """Token cost of each step's calls (the SLM draft and, when handed over, the LLM's step), step 0 first."""
    out = np.zeros(len(trace.decisions))
    for c in trace.calls:
        if c.step is not None and c.step < len(out):
            out[c.step] += c.costs(model)["cost"]
    return out


def llm_step_share(trace: Trace) -> float:
    """Share of the trace's steps that the LLM wrote."""
    return float(np.mean([bool(a) for _, a in trace.decisions])) if trace.decisions else 0.0


def plateaued(rewards: Sequence[float], window: int, tol: float, min_iterations: int = 0) -> bool:
    """mean(last ``window`` rewards) - mean(the ``window`` before) < ``tol`` (needs 2 x window and
    ``min_iterations`` values; window 0 never plateaus)."""
    n = len(rewards)
    if window <= 0 or n < max(2 * window, min_iterations):
        return False
    return float(np.mean(rewards[n - window:]) - np.mean(rewards[n - 2 * window: n - window])) < tol


def advantages(correct: np.ndarray, costs: Sequence[np.ndarray], lam: float, groups: Sequence[Sequence[int]],
               cfg: TrainingConfig) -> list[np.ndarray]:
    """Per trace, the advantage of each of its steps (see the module docstring); ``costs`` are relative to the
    question's LLM-only cost, ``groups`` list the trace indices of each question's samples."""
    rewards = np.array([float(y) - lam * float(np.sum(c)) for y, c in zip(correct, costs)])
    if cfg.returns == "to_go":
        g = [returns_to_go(y, c, lam) for y, c in zip(correct, costs)]
        finals = [float(y) for y in correct]
    else:
        g = [np.full(len(c), r) for c, r in zip(costs, rewards)]
        finals = list(rewards)
    if cfg.baseline == "batch":
        mean = float(rewards.mean()) if len(rewards) else 0.0
        return [x - mean for x in g]
    out: list[np.ndarray] = [np.zeros(0)] * len(g)
    for idx in groups:
        for i, a in zip(idx, leave_one_out_advantages([g[i] for i in idx], [finals[i] for i in idx])):
            out[i] = a
    return out


@dataclass
class Grader:
    """``grade_traces`` memoized on (answer text, gold, kind): sampled traces repeat the same answers."""

    done: dict = field(default_factory=dict)

    def __call__(self, traces: Sequence[Trace], records: Sequence[Record]) -> np.ndarray:
        from corea.evaluate.online import grade_traces

        keys = [(t.text or "", r.gold, r.kind) for t, r in zip(traces, records)]
        todo = {k: i for i, k in enumerate(keys) if k not in self.done}
        if todo:
            idx = list(todo.values())
            for k, y in zip(todo, grade_traces([traces[i] for i in idx], [records[i] for i in idx])):
                self.done[k] = float(y)
        return np.array([self.done[k] for k in keys])


def new_policy(cfg: TrainingConfig, s: Settings) -> StepPolicy:
    import torch

    policy = StepPolicy(cfg.hidden, seed=cfg.seed, derived=cfg.derived,
                        mixture=s.mixture if "posterior" in cfg.derived else None)
    with torch.no_grad():
        policy.net[-1].weight.zero_()
        policy.net[-1].bias.fill_(cfg.init_bias)
    return policy


def train(tiers, records: Sequence[Record], params, s: Settings, model: CostModel, cfg: TrainingConfig,
          llm_cost: np.ndarray | None = None, log_fn: Callable[[str], None] | None = None
          ) -> tuple[StepPolicy, list[dict[str, float]]]:
    """REINFORCE on ``records`` (``tiers``: engines dict or ``Tiers``; ``llm_cost``: each question's LLM-only
    cost, run here when not given). Returns the policy and its learning curve."""
    import torch

    from corea.evaluate.online import run_traces, single_tier

    if llm_cost is None:
        llm_cost = single_tier("llm", tiers, records, params, model).cost
    policy = new_policy(cfg, s)
    opt = torch.optim.Adam(policy.net.parameters(), lr=cfg.lr)
    rng, grade, history = np.random.default_rng(cfg.seed), Grader(), []
    batch = [r for r in records for _ in range(cfg.samples)]
    denom = np.repeat(np.asarray(llm_cost, dtype=float), cfg.samples)
    groups = [list(range(q * cfg.samples, (q + 1) * cfg.samples)) for q in range(len(records))]
    for it in range(cfg.iterations):
        start, misses = time.perf_counter(), getattr(tiers, "misses", None)
        traces = run_traces("stepwise_policy", tiers, batch, params, replace(s, policy=policy), explore=rng)
        correct = grade(traces, batch)
        costs = [step_costs(t, model) / d for t, d in zip(traces, denom)]
        adv = advantages(correct, costs, cfg.lam, groups, cfg)
        if it == 0 and cfg.standardize and any(t.decisions for t in traces):
            policy.standardize(np.stack([f for t in traces for f, _ in t.decisions]))
        loss = policy_gradient_step(policy, opt, [t.decisions for t in traces], adv, cfg.entropy)
        rel = np.array([c.sum() for c in costs])
        history.append({"iteration": it, "reward": float(np.mean(correct - cfg.lam * rel)),
                        "pass_at_1": float(correct.mean()), "cost_rel": float(rel.mean()),
                        "llm_step_share": float(np.mean([llm_step_share(t) for t in traces])), "loss": loss,
                        "engine_calls": (tiers.misses - misses) if misses is not None else len(batch),
                        "seconds": time.perf_counter() - start})
        log.info("policy iteration %d: %s", it, history[-1])
        if log_fn is not None:
            log_fn(f"    lambda {cfg.lam:g} it {it:>2}: reward {history[-1]['reward']:+.3f} pass@1 "
                   f"{history[-1]['pass_at_1']:.3f} cost {history[-1]['cost_rel']:.2f} LLM steps "
                   f"{history[-1]['llm_step_share']:.2f}")
        if plateaued([h["reward"] for h in history], cfg.plateau_window, cfg.plateau_tol, cfg.min_iterations):
            break
    return policy, history


def train_frontier(tiers, records, params, s: Settings, model: CostModel, lams: Sequence[float],
                   cfg: TrainingConfig, log_fn=None) -> dict[float, tuple[StepPolicy, list[dict[str, float]]]]:
    """One policy per lambda (same seed, questions and LLM-only costs): the points of the Lagrangian frontier."""
    from corea.evaluate.online import single_tier

    llm_cost = single_tier("llm", tiers, records, params, model).cost
    return {float(lam): train(tiers, records, params, s, model, replace(cfg, lam=float(lam)), llm_cost, log_fn)
            for lam in lams}
