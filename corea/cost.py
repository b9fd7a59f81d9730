"""Token cost model of the SLM-then-LLM cascade, in SLM input-token units.

    C_SLM = n_in + 4 * n_out                        (the SLM's own tokens)
    C_LLM = (N_LLM / N_SLM) * (n_in + 4 * n_out)    (the LLM's own tokens; 32/7 for Qwen2.5-32B over 7B)
    cascade:  C_SLM + [c < tau] * C_LLM             (a missing confidence defers)
    router:   C_router + (p_router >= tau ? C_SLM : C_LLM)

Thresholds are swept over [0, 1.1]; tau = 1.1 defers every query.

Multi-call traces (``corea.collab``) cost each call over its own tokens, so a handoff pays its prefix again:
    call:         ratio * (n_in + 4 n_out)
    prefix-cached: ratio * ((n_in - n_cached) + 0.1 n_cached + 4 n_out)   (n_cached already in that tier's cache)
    FLOPs:        2 * params * ((n_in - n_cached) + n_out)                  (prefill of new tokens plus decoding)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

OUTPUT_TOKEN_WEIGHT = 4.0
QWEN_32B_OVER_7B = 32.0 / 7.0
MAX_THRESHOLD = 1.1


def token_cost(n_in, n_out, size_ratio: float = 1.0) -> np.ndarray:
    """size_ratio * (n_in + 4 * n_out), elementwise."""
    return size_ratio * (np.asarray(n_in, dtype=float) + OUTPUT_TOKEN_WEIGHT * np.asarray(n_out, dtype=float))


CACHED_INPUT_WEIGHT = 0.1


def cached_token_cost(n_in, n_out, n_cached, size_ratio: float = 1.0) -> np.ndarray:
    """size_ratio * ((n_in - n_cached) + 0.1 n_cached + 4 n_out): input tokens in the tier's prefix cache at 0.1x."""
    n_in, n_cached = np.asarray(n_in, dtype=float), np.asarray(n_cached, dtype=float)
    if np.any(n_cached > n_in) or np.any(n_cached < 0):
        raise ValueError("cached tokens must lie in [0, n_in]")
    return size_ratio * (n_in - n_cached + CACHED_INPUT_WEIGHT * n_cached
                         + OUTPUT_TOKEN_WEIGHT * np.asarray(n_out, dtype=float))


def flops(n_in, n_out, n_params: float, n_cached=0) -> np.ndarray:
    """2 * params * (uncached input tokens + output tokens): forward FLOPs of one call with its prefix cache."""
    return 2.0 * float(n_params) * (np.asarray(n_in, float) - np.asarray(n_cached, float) + np.asarray(n_out, float))


def thresholds(step: float = 0.05, upper: float = MAX_THRESHOLD) -> np.ndarray:
    """tau in {0, step, 2 step, ..., upper}."""
    return np.round(np.arange(0.0, upper + step / 2, step), 10)


def defers(confidence: Sequence[float | None], tau: float) -> np.ndarray:
    """[c < tau] per query; a missing confidence (None or NaN) always defers (``corea.collab.rules.defers``)."""
    from corea.collab.rules import defers_many

    return defers_many(confidence, tau)


@dataclass(frozen=True)
class CascadePoint:
    """What a routing system achieves at one threshold, per query on average."""

    threshold: float
    pass_at_1: float
    avg_cost: float  # slm_cost + llm_cost
    slm_cost: float  # SLM tokens (plus the router's, for the router system)
    llm_cost: float
    relative_cost: float  # avg_cost / mean C_LLM (LLM-only)
    llm_pct: float  # share of queries answered by the LLM, percent

    def as_dict(self) -> dict:
        return asdict(self)


def _point(tau, use_llm, slm_correct, llm_correct, slm_side_cost, llm_cost) -> CascadePoint:
    slm_correct = np.asarray(slm_correct, dtype=float)
    llm_correct = np.asarray(llm_correct, dtype=float)
    llm_cost = np.asarray(llm_cost, dtype=float)
    if not (len(use_llm) == len(slm_correct) == len(llm_correct) == len(slm_side_cost) == len(llm_cost)):
        raise ValueError("cascade inputs differ in length")
    if len(use_llm) == 0:
        raise ValueError("cascade of no queries")
    correct = np.where(use_llm, llm_correct, slm_correct)
    slm = float(np.mean(slm_side_cost))
    llm = float(np.mean(np.where(use_llm, llm_cost, 0.0)))
    llm_only = float(np.mean(llm_cost))
    return CascadePoint(
        threshold=float(tau),
        pass_at_1=float(correct.mean()),
        avg_cost=slm + llm,
        slm_cost=slm,
        llm_cost=llm,
        relative_cost=(slm + llm) / llm_only if llm_only > 0 else float("nan"),
        llm_pct=100.0 * float(np.mean(use_llm)),
    )


def cascade_point(confidence, slm_correct, slm_cost, llm_correct, llm_cost, tau: float) -> CascadePoint:
    """The SLM answers when its confidence c >= tau, otherwise the LLM does (the SLM's cost is always paid)."""
    return _point(tau, defers(confidence, tau), slm_correct, llm_correct, np.asarray(slm_cost, float), llm_cost)


def router_point(router_prob, router_cost, slm_correct, slm_cost, llm_correct, llm_cost, tau: float) -> CascadePoint:
    """A router predicts p = P(SLM correct) before any answer; p >= tau sends the query to the SLM only."""
    use_llm = defers(router_prob, tau)
    slm_side = np.asarray(router_cost, float) + np.where(use_llm, 0.0, np.asarray(slm_cost, float))
    return _point(tau, use_llm, slm_correct, llm_correct, slm_side, llm_cost)


def cascade_sweep(confidence, slm_correct, slm_cost, llm_correct, llm_cost, taus=None) -> list[CascadePoint]:
    """``cascade_point`` at every threshold (default ``thresholds()``)."""
    taus = thresholds() if taus is None else taus
    return [cascade_point(confidence, slm_correct, slm_cost, llm_correct, llm_cost, t) for t in taus]


def router_sweep(router_prob, router_cost, slm_correct, slm_cost, llm_correct, llm_cost, taus=None) -> list[CascadePoint]:
    """``router_point`` at every threshold (default ``thresholds()``)."""
    taus = thresholds() if taus is None else taus
    return [router_point(router_prob, router_cost, slm_correct, slm_cost, llm_correct, llm_cost, t) for t in taus]
