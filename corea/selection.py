"""Threshold choice over a sweep of thresholds tau: pure functions, used by evaluation (``corea.evaluate.cascade``)
and by the collaboration strategies' calibration (``corea.collab.policy``)."""

from __future__ import annotations

import numpy as np


def select_max_drop(taus, pass_at_1, avg_cost, llm_pass_at_1: float, max_drop: float) -> float:
    """The cheapest tau with pass@1 >= llm_pass_at_1 - max_drop (ties: higher pass@1, then lower tau).

    A sweep reaching tau = 1.1 (everything deferred, pass@1 = the LLM's) always has one; otherwise the
    highest-pass@1 tau is returned when none qualifies."""
    taus, acc, cost = (np.asarray(a, dtype=float) for a in (taus, pass_at_1, avg_cost))
    ok = acc >= llm_pass_at_1 - max_drop - 1e-12
    if not ok.any():
        return float(taus[np.lexsort((taus, -acc))[0]])
    idx = np.flatnonzero(ok)
    return float(taus[idx[np.lexsort((taus[idx], -acc[idx], cost[idx]))[0]]])


def select_budget(taus, pass_at_1, relative_cost, budget: float) -> float | None:
    """The tau of highest pass@1 with relative cost <= budget (ties: lower cost, then lower tau); None when
    no tau fits (the budget is below the cost of never deferring)."""
    taus, acc, cost = (np.asarray(a, dtype=float) for a in (taus, pass_at_1, relative_cost))
    idx = np.flatnonzero(cost <= budget + 1e-12)
    if idx.size == 0:
        return None
    return float(taus[idx[np.lexsort((taus[idx], cost[idx], -acc[idx]))[0]]])
