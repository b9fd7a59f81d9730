"""Operating points of an online strategy: the threshold chosen on a calibration sweep, its bootstrap interval,
and the held-out figures at it with paired bootstrap intervals.

A sweep is per-question arrays over a grid of m thresholds: correct[m, n], cost[m, n], llm_share[m, n] (n
questions), beside LLM-only's correct[n] and cost[n] on the same questions. At threshold k:
    pass@1_k = mean_q correct[k, q],   cost_rel_k = sum_q cost[k, q] / sum_q cost_LLM[q],
    drop_k = pass@1(LLM) - pass@1_k.
The choice for a max-drop target is ``corea.selection.select_max_drop`` over the grid (the cheapest threshold
with drop <= max_drop; ties: higher pass@1, then the earlier grid point). Intervals are the cascade's
(``corea.evaluate.cascade``): percentile bootstraps that resample questions with replacement
(``corea.evaluate.tables.replicates`` / ``interval``), the strategy and LLM-only on the same resample, so the drop
is paired. The threshold's own interval re-runs the choice on each resample of the calibration questions: how
far the calibrated tau moves when the calibration questions change (percentile bounds rounded outward to the
grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from corea.evaluate.tables import Interval, interval, replicates
from corea.selection import select_max_drop


@dataclass
class Sweep:
    """One strategy's per-question outcomes over a threshold grid on one split."""

    taus: np.ndarray  # [m]
    correct: np.ndarray  # [m, n]
    cost: np.ndarray  # [m, n]
    llm_share: np.ndarray  # [m, n]

    @classmethod
    def of(cls, outcomes: Sequence) -> "Sweep":
        """From ``corea.evaluate.online.Outcome`` objects, one per threshold."""
        return cls(np.array([o.threshold for o in outcomes], dtype=float), np.stack([o.correct for o in outcomes]),
                   np.stack([o.cost for o in outcomes]), np.stack([o.llm_share for o in outcomes]))

    def take(self, idx: np.ndarray) -> "Sweep":
        return Sweep(self.taus, self.correct[:, idx], self.cost[:, idx], self.llm_share[:, idx])


def choose_index(sweep: Sweep, llm_correct: np.ndarray, llm_cost: np.ndarray, max_drop: float) -> int:
    """Grid index of the cheapest threshold within ``max_drop`` of LLM-only's pass@1 (see the module docstring)."""
    acc = sweep.correct.mean(axis=1)
    rel = sweep.cost.sum(axis=1) / max(float(np.sum(llm_cost)), 1e-12)
    grid = np.arange(len(sweep.taus), dtype=float)
    return int(select_max_drop(grid, acc, rel, float(np.mean(llm_correct)), max_drop))


def threshold_interval(sweep: Sweep, llm_correct, llm_cost, max_drop: float, n_boot: int = 1000,
                       level: float = 0.95, seed: int = 0) -> Interval:
    """The calibrated tau and the percentile interval of the tau chosen on question resamples of the split."""
    llm_correct, llm_cost = np.asarray(llm_correct, dtype=float), np.asarray(llm_cost, dtype=float)
    tau = float(sweep.taus[choose_index(sweep, llm_correct, llm_cost, max_drop)])

    def fn(i: np.ndarray) -> float:
        return float(sweep.taus[choose_index(sweep.take(i), llm_correct[i], llm_cost[i], max_drop)])

    iv = interval(tau, replicates(np.arange(len(llm_correct)), fn, n_boot, seed)[:, 0], level)
    grid = np.sort(sweep.taus)
    if np.isnan(iv.low):
        return iv
    low = grid[grid <= iv.low + 1e-9].max(initial=grid[0])  # the percentile bounds on the grid, outward
    high = grid[grid >= iv.high - 1e-9].min(initial=grid[-1])
    return Interval(tau, float(low), float(high))


def point_values(correct, cost, llm_share, llm_correct, llm_cost) -> np.ndarray:
    """[pass@1, cost_rel, llm_share, drop] of one operating point."""
    p = float(np.mean(correct))
    return np.array([p, float(np.sum(cost) / max(float(np.sum(llm_cost)), 1e-12)), float(np.mean(llm_share)),
                     float(np.mean(llm_correct)) - p])


POINT_KEYS = ("pass_at_1", "cost_rel", "llm_share", "drop")


def held_out_intervals(correct, cost, llm_share, llm_correct, llm_cost, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> dict[str, Interval]:
    """The held-out point's pass@1, cost_rel, llm_share and drop vs LLM-only with paired question-bootstrap
    intervals."""
    arrays = [np.asarray(a, dtype=float) for a in (correct, cost, llm_share, llm_correct, llm_cost)]
    value = point_values(*arrays)
    reps = replicates(np.arange(len(arrays[0])), lambda i: point_values(*(a[i] for a in arrays)), n_boot, seed + 1)
    return {k: interval(float(value[j]), reps[:, j], level) for j, k in enumerate(POINT_KEYS)}


def frontier(sweep: Sweep, llm_cost) -> list[dict[str, float]]:
    """pass@1, cost_rel and llm_share at every threshold of the sweep."""
    denom = max(float(np.sum(llm_cost)), 1e-12)
    return [{"tau": float(t), "pass_at_1": float(c.mean()), "cost_rel": float(k.sum() / denom),
             "llm_share": float(s.mean())} for t, c, k, s in zip(sweep.taus, sweep.correct, sweep.cost, sweep.llm_share)]
