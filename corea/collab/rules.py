"""The routing rules, pure and shared by evaluation and serving.

    cascade:          defer iff c < tau, or c missing (None / NaN)
    step confidence:  from the SLM's token probabilities p_1..p_k of a drafted step, over a look-ahead of L tokens:
                      "first" p_1, "mean" (1/L) sum p_i, "min" min p_i, "gmean" exp(mean log p_i)
    steer:            the LLM writes the step iff posterior(confident component | confidence) < tau
    stepwise_policy:  the LLM writes the step iff P(call LLM | features) >= tau
    cope:             the next stage runs iff the stage's verbalized confidence < tau (or is missing)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

AGGREGATES = ("first", "mean", "min", "gmean")


def _missing(c) -> bool:
    return c is None or (isinstance(c, float) and math.isnan(c))


def defers(confidence: float | None, tau: float) -> bool:
    """The COREA cascade rule for one answer: [c < tau], a missing confidence deferring."""
    return _missing(confidence) or float(confidence) < tau


def defers_many(confidence: Sequence[float | None], tau: float) -> np.ndarray:
    """``defers`` elementwise (float arrays are used as they are: NaN is missing)."""
    if isinstance(confidence, np.ndarray) and confidence.dtype.kind == "f":
        conf = confidence
    else:
        conf = np.array([np.nan if c is None else c for c in confidence], dtype=float)
    return np.isnan(conf) | (conf < tau)


def step_confidence(token_probs: Sequence[float], aggregate: str = "min", lookahead: int | None = None) -> float:
    """The SLM's confidence in a step from the probabilities of its first ``lookahead`` tokens (all if None).

    An empty step has confidence 0 (nothing the SLM would stand by)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if lookahead is not None and lookahead < 1:
        raise ValueError("lookahead must be >= 1 or None")
    probs = np.asarray(list(token_probs)[: lookahead] if lookahead else list(token_probs), dtype=float)
    if probs.size == 0:
        return 0.0
    if aggregate == "first":
        return float(probs[0])
    if aggregate == "mean":
        return float(probs.mean())
    if aggregate == "min":
        return float(probs.min())
    return float(np.exp(np.log(np.clip(probs, 1e-12, 1.0)).mean()))


def steer_calls_llm(posterior: float, tau: float) -> bool:
    """STEER: the LLM writes the step when the confident component's posterior is below tau."""
    return posterior < tau


def policy_calls_llm(p_llm: float, tau: float) -> bool:
    """Stepwise policy: the LLM writes the step when the policy's P(call LLM) reaches tau."""
    return p_llm >= tau


def cope_escalates(confidence: float | None, tau: float) -> bool:
    """COPE: a stage whose (verbalized) confidence is below tau, or missing, hands over to the next stage."""
    return defers(confidence, tau)
