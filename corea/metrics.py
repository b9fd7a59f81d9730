"""Evaluation metrics of a verbalized confidence.

Confidences are floats in [0, 1], with NaN (or None) for a response without a valid confidence. ECE, AUROC,
the Brier score and the reliability bins are computed over the responses that do state a confidence; how many
do is the confidence output ratio. Selective prediction (the risk-coverage curve, AURC, selective accuracy)
ranks ALL responses by confidence, a missing one last (as the cascade defers it): answering the k most
confident of N responses is coverage k/N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

ArrayLike = Sequence[float | None] | np.ndarray


def _confidences(confidence: ArrayLike) -> np.ndarray:
    if isinstance(confidence, np.ndarray) and confidence.dtype.kind == "f":
        return confidence.astype(float, copy=False)
    return np.array([np.nan if c is None else c for c in confidence], dtype=float)


def _valid(confidence: ArrayLike, correct: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf = _confidences(confidence)
    y = np.asarray(correct, dtype=float)
    if conf.shape != y.shape:
        raise ValueError(f"{conf.shape[0]} confidences for {y.shape[0]} correctness labels")
    keep = ~np.isnan(conf)
    return conf[keep], y[keep]


def pass_at_1(correct: Sequence[bool] | np.ndarray) -> float:
    """Mean correctness over all responses (over k runs of each question this is the mean per-run pass@1)."""
    y = np.asarray(correct, dtype=float)
    if y.size == 0:
        raise ValueError("pass@1 of no responses")
    return float(y.mean())


def confidence_output_ratio(confidence: ArrayLike) -> float:
    """Share of responses with a valid confidence."""
    conf = _confidences(confidence)
    if conf.size == 0:
        raise ValueError("confidence output ratio of no responses")
    return float((~np.isnan(conf)).mean())


@dataclass(frozen=True)
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    accuracy: float  # NaN for an empty bin
    confidence: float  # mean confidence in the bin, NaN for an empty bin


def reliability_bins(confidence: ArrayLike, correct: Sequence[bool], n_bins: int = 10) -> list[ReliabilityBin]:
    """Equal-width bins [k/M, (k+1)/M) over [0, 1]; confidence 1.0 falls in the last bin."""
    conf, y = _valid(confidence, correct)
    index = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    bins = []
    for k in range(n_bins):
        members = index == k
        count = int(members.sum())
        bins.append(
            ReliabilityBin(
                lower=k / n_bins,
                upper=(k + 1) / n_bins,
                count=count,
                accuracy=float(y[members].mean()) if count else float("nan"),
                confidence=float(conf[members].mean()) if count else float("nan"),
            )
        )
    return bins


def ece(confidence: ArrayLike, correct: Sequence[bool], n_bins: int = 10) -> float:
    """Expected calibration error: sum_m |B_m|/N * |acc(B_m) - conf(B_m)| over equal-width bins.

    NaN when no response states a confidence."""
    bins = reliability_bins(confidence, correct, n_bins)
    n = sum(b.count for b in bins)
    if n == 0:
        return float("nan")
    return float(sum(b.count / n * abs(b.accuracy - b.confidence) for b in bins if b.count))


def auroc(confidence: ArrayLike, correct: Sequence[bool]) -> float:
    """Area under the ROC curve of confidence as a predictor of correctness (ties count half).

    scikit-learn's ``roc_auc_score``; NaN when only one class is present."""
    conf, y = _valid(confidence, correct)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, conf))


def brier(confidence: ArrayLike, correct: Sequence[bool]) -> float:
    """Brier score: (1/N) sum_i (c_i - y_i)^2 over responses with a confidence (scikit-learn's
    ``brier_score_loss``); NaN when none states one."""
    conf, y = _valid(confidence, correct)
    return float(np.mean((conf - y) ** 2)) if conf.size else float("nan")


def risk_coverage(confidence: ArrayLike, correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(coverage k/N, risk(k)) for k = 1..N: risk(k) is the error rate of the k most confident responses.

    Responses are sorted by confidence, highest first, a missing confidence lowest. Within a block of tied
    confidences the order is taken at random and risk(k) is its expectation: errors before the block plus
    (k - n_before) times the block's error rate, over k. Without ties this is the plain sorted risk."""
    conf = _confidences(confidence)
    wrong = 1.0 - np.asarray(correct, dtype=float)
    if conf.shape != wrong.shape:
        raise ValueError(f"{conf.shape[0]} confidences for {wrong.shape[0]} correctness labels")
    n = conf.size
    if n == 0:
        return np.empty(0), np.empty(0)
    key = np.where(np.isnan(conf), -np.inf, conf)
    order = np.argsort(-key, kind="stable")
    key, wrong = key[order], wrong[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])  # first index of each tie block
    sizes = np.diff(np.r_[starts, n])
    block_err = np.add.reduceat(wrong, starts)
    before_n = np.repeat(starts, sizes)
    before_err = np.repeat(np.r_[0.0, np.cumsum(block_err)[:-1]], sizes)
    k = np.arange(1, n + 1)
    errors = before_err + (k - before_n) * np.repeat(block_err / sizes, sizes)
    return k / n, errors / k


def aurc(confidence: ArrayLike, correct: Sequence[bool]) -> float:
    """Area under the risk-coverage curve: (1/N) sum_{k=1..N} risk(k) (lower is better); NaN for no rows."""
    _, risk = risk_coverage(confidence, correct)
    return float(risk.mean()) if risk.size else float("nan")


def selective_accuracy(confidence: ArrayLike, correct: Sequence[bool], coverage: float) -> float:
    """Accuracy of the ceil(coverage * N) most confident responses: 1 - risk(k) (ties as in ``risk_coverage``)."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    _, risk = risk_coverage(confidence, correct)
    if not risk.size:
        return float("nan")
    return float(1.0 - risk[max(1, math.ceil(coverage * risk.size - 1e-9)) - 1])


#: Coverages at which reports give the selective accuracy.
SELECTIVE_COVERAGES = (0.5, 0.8)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval."""

    value: float
    low: float
    high: float


def bootstrap(
    metric: Callable[..., float],
    *arrays: Sequence,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``metric(*arrays)``, resampling rows of all arrays jointly.

    Resamples on which the metric is undefined (NaN) are dropped."""
    columns = [np.asarray([np.nan if v is None else v for v in a], dtype=float) for a in arrays]
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError("bootstrap arrays differ in length")
    value = metric(*columns)
    rng = np.random.default_rng(seed)
    stats = np.array([metric(*(c[idx] for c in columns)) for idx in rng.integers(0, n, size=(n_boot, n))])
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return Interval(value, float("nan"), float("nan"))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def pass_at_1_ci(correct: Sequence[bool], **kw) -> Interval:
    return bootstrap(pass_at_1, correct, **kw)


def ece_ci(confidence: ArrayLike, correct: Sequence[bool], n_bins: int = 10, **kw) -> Interval:
    return bootstrap(lambda c, y: ece(c, y, n_bins), confidence, correct, **kw)


def auroc_ci(confidence: ArrayLike, correct: Sequence[bool], **kw) -> Interval:
    return bootstrap(auroc, confidence, correct, **kw)


def brier_ci(confidence: ArrayLike, correct: Sequence[bool], **kw) -> Interval:
    return bootstrap(brier, confidence, correct, **kw)


def aurc_ci(confidence: ArrayLike, correct: Sequence[bool], **kw) -> Interval:
    return bootstrap(aurc, confidence, correct, **kw)


def confidence_output_ratio_ci(confidence: ArrayLike, **kw) -> Interval:
    return bootstrap(confidence_output_ratio, confidence, **kw)
