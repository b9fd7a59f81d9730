"""Metrics per dataset and per dataset group, with question-level (cluster) bootstrap intervals.

For one dataset with rows (question q, run r), correctness y and confidence c (NaN = none):

    pass@1        mean of y over all rows (= the mean over runs of each run's pass@1)
    pass@1 std    population std (ddof=0) over runs r of pass@1_r = mean_q y_qr
    ECE           sum_m |B_m|/N |acc(B_m) - conf(B_m)|, 10 equal-width bins, rows with a confidence
    AUROC         P(c_correct > c_wrong) + P(tie)/2, rows with a confidence (NaN with one class)
    COR           share of rows with a confidence
    Brier         mean (c - y)^2, rows with a confidence
    AURC          mean over k of the error rate of the k most confident rows (no confidence ranks last)
    Sel@q         accuracy of the ceil(q N) most confident rows, q = 50%, 80% (``corea.metrics``)

A group's value is the macro mean over its datasets (datasets with an undefined value are skipped); its
pass@1 std is the std over runs of the macro-mean per-run pass@1. Intervals are percentile bootstraps that
resample questions (with all their runs) with replacement within each dataset; a group's replicate b is the
macro mean of its datasets' replicates b. Resamples are seeded per dataset, so every system sees the same ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from corea.metrics import SELECTIVE_COVERAGES, Interval, aurc, brier, selective_accuracy

METRICS = ("pass_at_1", "ece", "auroc", "confidence_output_ratio", "brier", "aurc", "selective_accuracy_50",
           "selective_accuracy_80")
GROUP_ORDER = ("in_domain", "ood_math", "ood_nonmath", "custom")
GROUP_LABELS = {
    "in_domain": "In-domain",
    "ood_math": "OOD math",
    "ood_nonmath": "OOD non-math",
    "custom": "Custom",
}
DATASET_LABELS = {"deepmath500": "DeepMath500", "math500": "MATH-500", "gsm8k": "GSM8K",
                  "olympiadbench": "OlympiadBench", "gpqa": "GPQA", "commonsenseqa": "CSQA"}


def scope_label(scope: str) -> str:
    """The printed name of a dataset group or a dataset."""
    return GROUP_LABELS.get(scope) or DATASET_LABELS.get(scope, scope)


# ------------------------------------------------------------------------------------------ metrics
def ece_fast(score: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """``corea.metrics.ece`` on arrays, vectorized: sum_m |sum_{B_m} y - sum_{B_m} c| / N."""
    keep = ~np.isnan(score)
    c, y = score[keep], correct[keep].astype(float)
    if c.size == 0:
        return float("nan")
    idx = np.minimum((c * n_bins).astype(int), n_bins - 1)
    diff = np.bincount(idx, weights=y, minlength=n_bins) - np.bincount(idx, weights=c, minlength=n_bins)
    return float(np.abs(diff).sum() / c.size)


def auroc_fast(score: np.ndarray, correct: np.ndarray) -> float:
    """``corea.metrics.auroc`` on arrays (Mann-Whitney with average ranks: ties count half)."""
    keep = ~np.isnan(score)
    c, y = score[keep], correct[keep].astype(bool)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = pd.Series(c).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def metric_vector(score: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """[pass@1, ECE, AUROC, COR, Brier, AURC, Sel@50, Sel@80] of one set of rows (the order of ``METRICS``)."""
    if correct.size == 0:
        return np.full(len(METRICS), np.nan)
    return np.array([
        correct.mean(),
        ece_fast(score, correct, n_bins),
        auroc_fast(score, correct),
        float((~np.isnan(score)).mean()),
        brier(score, correct),
        aurc(score, correct),
        *(selective_accuracy(score, correct, q) for q in SELECTIVE_COVERAGES),
    ])


def per_run_pass(run: np.ndarray, correct: np.ndarray) -> pd.Series:
    """pass@1 of each run, indexed by run."""
    return pd.Series(correct.astype(float)).groupby(run).mean()


# ---------------------------------------------------------------------------------------- bootstrap
def dataset_seed(seed: int, dataset: str) -> int:
    """The bootstrap seed of one dataset: fixed by (seed, dataset name)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{dataset}".encode()).digest()[:4], "big")


class Clusters:
    """Rows grouped by question, for resampling questions with replacement (each with all its rows)."""

    def __init__(self, question: Iterable):
        values = question if isinstance(question, (pd.Series, np.ndarray)) else np.asarray(list(question), dtype=object)
        codes, _ = pd.factorize(values)
        self.order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes) if codes.size else np.zeros(0, dtype=int)
        self.lengths = counts
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if counts.size else counts
        self.n_questions = counts.size

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Row indices of one resample: n_questions questions drawn with replacement."""
        pick = rng.integers(0, self.n_questions, self.n_questions)
        lengths = self.lengths[pick]
        total = int(lengths.sum())
        offsets = np.repeat(self.starts[pick] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return self.order[offsets + np.arange(total)]


def replicates(question: Iterable, fn: Callable[[np.ndarray], np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, m] values of ``fn(row_indices)`` over question-level resamples."""
    clusters = Clusters(question)
    rng = np.random.default_rng(seed)
    if clusters.n_questions == 0:
        return np.full((n_boot, 1), np.nan)
    return np.array([np.atleast_1d(fn(clusters.draw(rng))) for _ in range(n_boot)], dtype=float)


def interval(value: float, reps: np.ndarray, level: float = 0.95) -> Interval:
    """Percentile interval of the replicates ``reps`` (NaN replicates dropped) around ``value``."""
    reps = reps[~np.isnan(reps)]
    if reps.size == 0 or np.isnan(value):
        return Interval(float(value), float("nan"), float("nan"))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(reps, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def macro(values: Iterable[np.ndarray]) -> np.ndarray:
    """Elementwise mean over datasets, skipping NaN; NaN where every dataset is NaN."""
    stack = np.array(list(values), dtype=float)
    if stack.size == 0:
        return stack
    with np.errstate(invalid="ignore"):
        count = (~np.isnan(stack)).sum(axis=0)
        total = np.nansum(stack, axis=0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ------------------------------------------------------------------------------------------ tables
@dataclass
class MetricRow:
    """One (source, scope) row: values with intervals and the std of pass@1 over runs."""

    source: str
    scope: str  # a dataset name or a group name
    is_group: bool
    values: dict[str, Interval]
    pass_at_1_std: float
    n_questions: int
    n_runs: int

    def as_dict(self) -> dict:
        out = {"source": self.source, "scope": self.scope, "is_group": self.is_group,
               "pass_at_1_std": self.pass_at_1_std, "n_questions": self.n_questions, "n_runs": self.n_runs}
        for key, iv in self.values.items():
            out[key], out[f"{key}_ci"] = iv.value, [iv.low, iv.high]
        return out


def ordered_groups(groups: Iterable[str]) -> list[str]:
    present = set(groups)
    return [g for g in GROUP_ORDER if g in present] + sorted(present - set(GROUP_ORDER))


def metric_rows(
    frame: pd.DataFrame,
    source: str,
    datasets: list[str],
    n_boot: int = 1000,
    level: float = 0.95,
    n_bins: int = 10,
    seed: int = 0,
) -> list[MetricRow]:
    """Rows per dataset then per group for one confidence source.

    ``frame`` has columns dataset, group, id, run, score (NaN = none), correct.
    """
    rows, points, reps, runs, groups = [], {}, {}, {}, {}
    for name in datasets:
        part = frame[frame["dataset"] == name]
        if part.empty:
            continue
        score = part["score"].to_numpy(float)
        correct = part["correct"].to_numpy(bool)
        points[name] = metric_vector(score, correct, n_bins)
        reps[name] = replicates(part["id"], lambda i: metric_vector(score[i], correct[i], n_bins), n_boot,
                                dataset_seed(seed, name))
        runs[name] = per_run_pass(part["run"].to_numpy(), correct)
        groups.setdefault(part["group"].iloc[0], []).append(name)
        rows.append(MetricRow(source, name, False, _intervals(points[name], reps[name], level),
                              float(np.std(runs[name].to_numpy())), part["id"].nunique(), runs[name].size))
    for group in ordered_groups(groups):
        members = groups[group]
        per_run = pd.concat([runs[m] for m in members], axis=1, join="inner").mean(axis=1)
        rows.append(MetricRow(
            source, group, True,
            _intervals(macro(points[m] for m in members), macro(reps[m] for m in members), level),
            float(np.std(per_run.to_numpy())) if per_run.size else float("nan"),
            sum(r.n_questions for r in rows if r.scope in members), int(per_run.size),
        ))
    return rows


def _intervals(point: np.ndarray, reps: np.ndarray, level: float) -> dict[str, Interval]:
    return {key: interval(float(point[k]), reps[:, k], level) for k, key in enumerate(METRICS)}


def source_frames(records: pd.DataFrame, joined: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Confidence sources for the metric tables: each system's score against its SLM's correctness, and the
    LLM's own verbalized confidence against its correctness."""
    out = {name: j.rename(columns={"slm_correct": "correct"})[["dataset", "group", "id", "run", "score", "correct"]]
           for name, j in joined.items()}
    llm = records[records["model"] == "llm"]
    if not llm.empty:
        out["LLM"] = llm.assign(score=llm["confidence"])[["dataset", "group", "id", "run", "score", "correct"]]
    return out
