"""Cascade simulation from saved records, and threshold selection on a calibration split.

Per dataset and threshold tau, with records matched on (dataset, id, run) (see ``records.join_system``):

    cascade:  LLM answers iff c < tau or c missing;   cost = C_SLM + [defer] C_LLM
    router:   LLM answers iff p_router < tau or p missing; cost = C_router + (defer ? C_LLM : C_SLM)
    pass@1 = mean correctness of the answering model; relative cost = avg cost / mean C_LLM; LLM% = 100 mean[defer]

(``corea.cost.cascade_point`` / ``router_point``). A group's point is the macro mean of its datasets' points,
each field averaged. The default threshold ``llm_pass_at_1`` is, per dataset, the LLM's pass@1 on it.

Threshold selection (pure functions over a sweep, ``corea.selection``): ``select_max_drop`` takes the cheapest
tau whose pass@1 is at least LLM pass@1 - max_drop; ``select_budget`` the tau of highest pass@1 whose relative
cost is within the budget. Tau is chosen on the calibration questions and reported on the held-out ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
import pandas as pd

from corea.collab.rules import defers_many
from corea.cost import CascadePoint, cascade_point, router_point, thresholds
from corea.evaluate.records import calibration_mask, join_system
from corea.evaluate.tables import Interval, dataset_seed, interval, macro, ordered_groups, replicates
from corea.selection import select_budget, select_max_drop

POINT_FIELDS = tuple(f.name for f in fields(CascadePoint))
VALUE_FIELDS = ("pass_at_1", "avg_cost", "slm_cost", "llm_cost", "relative_cost", "llm_pct")


@dataclass(frozen=True)
class System:
    """A routing system: the SLM role answering first, the column used as its confidence, an optional router."""

    name: str
    slm: str
    score: str
    router: str | None = None


SYSTEMS: tuple[System, ...] = (
    System("SLM-Verb", "slm_verb", "confidence"),
    System("RLVR-SLM-Verb", "rlvr", "confidence"),
    System("RLVR-SLM-AvgProb", "rlvr", "mean_token_prob"),
    System("RLVR-SLM-Probe", "rlvr", "probe_confidence"),
    System("Router + RLVR-SLM", "rlvr", "confidence", router="router"),
    System("Brier-SLM-Verb", "brier", "confidence"),
    System("COREA", "corea", "confidence"),
)


def join_systems(records: pd.DataFrame, size_ratio: float) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """{system name: joined frame} for the systems whose roles are present, and the names of absent ones."""
    joined, absent = {}, []
    for s in SYSTEMS:
        frame = join_system(records, s.slm, s.score, size_ratio, router=s.router)
        if frame is None:
            absent.append(s.name)
        else:
            joined[s.name] = frame
    return joined, absent


def is_router(name: str) -> bool:
    return next(s for s in SYSTEMS if s.name == name).router is not None


# ------------------------------------------------------------------------------------------ points
def point(frame: pd.DataFrame, tau: float, router: bool = False) -> CascadePoint:
    """The cascade (or router) point of one dataset's joined rows at ``tau``."""
    args = (frame["slm_correct"].to_numpy(), frame["slm_cost"].to_numpy(), frame["llm_correct"].to_numpy(),
            frame["llm_cost"].to_numpy())
    score = frame["score"].to_numpy(float)
    if router:
        return router_point(score, frame["router_cost"].to_numpy(), *args, tau)
    return cascade_point(score, *args, tau)


def as_vector(p: CascadePoint) -> np.ndarray:
    return np.array([getattr(p, f) for f in VALUE_FIELDS], dtype=float)


@dataclass(frozen=True)
class Arrays:
    """One dataset's joined rows as arrays, for the many evaluations of sweeps and bootstraps."""

    score: np.ndarray
    slm_correct: np.ndarray
    slm_cost: np.ndarray
    llm_correct: np.ndarray
    llm_cost: np.ndarray
    router_cost: np.ndarray

    @classmethod
    def of(cls, frame: pd.DataFrame) -> "Arrays":
        return cls(*(frame[c].to_numpy(float) for c in ("score", "slm_correct", "slm_cost", "llm_correct",
                                                        "llm_cost", "router_cost")))

    def take(self, idx: np.ndarray) -> "Arrays":
        return Arrays(*(a[idx] for a in (self.score, self.slm_correct, self.slm_cost, self.llm_correct,
                                         self.llm_cost, self.router_cost)))


def fast_values(a: Arrays, tau: float, router: bool = False) -> np.ndarray:
    """``as_vector(point(...))`` computed on arrays (``corea.cost``'s formulas, vectorized; tested equal)."""
    defer = defers_many(a.score, tau)  # the collab cascade rule
    correct = np.where(defer, a.llm_correct, a.slm_correct)
    slm = float(np.mean(a.router_cost + np.where(defer, 0.0, a.slm_cost))) if router else float(np.mean(a.slm_cost))
    llm = float(np.mean(np.where(defer, a.llm_cost, 0.0)))
    llm_only = float(np.mean(a.llm_cost))
    return np.array([correct.mean(), slm + llm, slm, llm, (slm + llm) / llm_only if llm_only > 0 else np.nan,
                     100.0 * defer.mean()])


def as_point(values: np.ndarray, tau: float) -> CascadePoint:
    return CascadePoint(threshold=float(tau), **dict(zip(VALUE_FIELDS, map(float, values))))


def macro_point(points: Sequence[CascadePoint], tau: float = float("nan")) -> CascadePoint:
    """Field-wise mean of dataset points (a group's point)."""
    values = macro(as_vector(p) for p in points)
    return CascadePoint(threshold=float(tau), **dict(zip(VALUE_FIELDS, map(float, values))))


def llm_pass(records: pd.DataFrame, dataset: str) -> float:
    """The LLM's pass@1 on one dataset (all its LLM rows)."""
    rows = records[(records["model"] == "llm") & (records["dataset"] == dataset)]
    return float(rows["correct"].mean()) if len(rows) else float("nan")


def default_thresholds(records: pd.DataFrame, datasets: Sequence[str], rule: float | str) -> dict[str, float]:
    """tau per dataset: a fixed number, or ``"llm_pass_at_1"`` (the LLM's pass@1 on that dataset)."""
    if rule == "llm_pass_at_1":
        return {d: llm_pass(records, d) for d in datasets}
    return {d: float(rule) for d in datasets}


@dataclass
class SystemResult:
    """One system's cascade figures: per dataset and per group at the default tau (with intervals), sweeps."""

    name: str
    at_default: dict[str, CascadePoint] = field(default_factory=dict)  # scope -> point
    intervals: dict[str, dict[str, Interval]] = field(default_factory=dict)  # scope -> field -> interval
    sweeps: dict[str, list[CascadePoint]] = field(default_factory=dict)  # scope -> points over taus


def evaluate_system(
    name: str,
    joined: pd.DataFrame,
    taus_default: dict[str, float],
    sweep_taus: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> SystemResult:
    """Default-threshold points with question-bootstrap intervals and sweeps, per dataset then per group."""
    router = is_router(name)
    result = SystemResult(name)
    reps, groups = {}, {}
    for dataset, tau in taus_default.items():
        part = joined[joined["dataset"] == dataset].reset_index(drop=True)
        if part.empty or np.isnan(tau):
            continue
        groups.setdefault(part["group"].iloc[0], []).append(dataset)
        arrays = Arrays.of(part)
        result.at_default[dataset] = point(part, tau, router)
        reps[dataset] = replicates(part["id"], lambda i: fast_values(arrays.take(i), tau, router), n_boot,
                                   dataset_seed(seed, dataset))
        result.intervals[dataset] = _intervals(result.at_default[dataset], reps[dataset], level)
        result.sweeps[dataset] = [as_point(fast_values(arrays, t, router), t) for t in sweep_taus]
    for group in ordered_groups(groups):
        members = groups[group]
        result.at_default[group] = macro_point([result.at_default[m] for m in members])
        result.intervals[group] = _intervals(result.at_default[group], macro(reps[m] for m in members), level)
        result.sweeps[group] = [macro_point([result.sweeps[m][k] for m in members], t) for k, t in enumerate(sweep_taus)]
    return result


def _intervals(p: CascadePoint, reps: np.ndarray, level: float) -> dict[str, Interval]:
    return {f: interval(getattr(p, f), reps[:, k], level) for k, f in enumerate(VALUE_FIELDS)}


def llm_only(records: pd.DataFrame, datasets: Sequence[str], size_ratio: float) -> dict[str, CascadePoint]:
    """The LLM-only reference per dataset and group (relative cost 1, LLM% 100)."""
    from corea.cost import token_cost

    out, groups = {}, {}
    for d in datasets:
        rows = records[(records["model"] == "llm") & (records["dataset"] == d)]
        if rows.empty:
            continue
        cost = float(token_cost(rows["prompt_tokens"], rows["output_tokens"], size_ratio).mean())
        out[d] = CascadePoint(float("nan"), float(rows["correct"].mean()), cost, 0.0, cost, 1.0, 100.0)
        groups.setdefault(rows["group"].iloc[0], []).append(d)
    for g in ordered_groups(groups):
        out[g] = macro_point([out[d] for d in groups[g]])
    return out


@dataclass
class Selection:
    """A tau chosen on the calibration split and what it achieves on the held-out split."""

    system: str
    group: str
    target: str  # "max_drop=0.02" or "budget=0.8"
    tau: float | None
    calibration: CascadePoint | None
    held_out: dict[str, Interval]  # pass_at_1, relative_cost, llm_pct, drop (LLM pass@1 - pass@1)
    meets_target: bool | None  # on the held-out point estimate

    def as_dict(self) -> dict:
        return {"system": self.system, "group": self.group, "target": self.target, "tau": self.tau,
                "calibration": self.calibration.as_dict() if self.calibration else None,
                "held_out": {k: {"value": v.value, "low": v.low, "high": v.high} for k, v in self.held_out.items()},
                "meets_target": self.meets_target}


def select_thresholds(
    name: str,
    joined: pd.DataFrame,
    max_drops: Sequence[float],
    budgets: Sequence[float],
    calibration_fraction: float = 0.5,
    step: float = 0.01,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> list[Selection]:
    """Per group: choose tau on the calibration questions for each target, evaluate it on the held-out ones.

    Held-out intervals bootstrap held-out questions (LLM and cascade on the same resample, so the drop is paired).
    """
    router = is_router(name)
    taus = thresholds(step)
    calib = calibration_mask(joined, calibration_fraction, seed)
    out = []
    for group in ordered_groups(joined["group"].unique()):
        rows = joined[joined["group"] == group]
        datasets = list(dict.fromkeys(rows["dataset"]))
        cal = {d: rows[(rows["dataset"] == d) & calib[rows.index]].reset_index(drop=True) for d in datasets}
        held = {d: rows[(rows["dataset"] == d) & ~calib[rows.index]].reset_index(drop=True) for d in datasets}
        if any(f.empty for f in cal.values()) or any(f.empty for f in held.values()):
            continue
        cal_arrays = [Arrays.of(cal[d]) for d in datasets]
        sweep = [as_point(macro(fast_values(a, t, router) for a in cal_arrays), t) for t in taus]
        acc = [p.pass_at_1 for p in sweep]
        cal_llm = float(np.mean([cal[d]["llm_correct"].mean() for d in datasets]))
        targets = [(f"max_drop={m:g}", select_max_drop(taus, acc, [p.avg_cost for p in sweep], cal_llm, m), ("drop", m))
                   for m in max_drops]
        targets += [(f"budget={b:g}", select_budget(taus, acc, [p.relative_cost for p in sweep], b), ("cost", b))
                    for b in budgets]
        for label, tau, (kind, bound) in targets:
            if tau is None:
                out.append(Selection(name, group, label, None, None, {}, None))
                continue
            k = int(round(tau / step))
            held_iv = _held_out(held, tau, router, n_boot, level, seed)
            value = held_iv["drop"].value if kind == "drop" else held_iv["relative_cost"].value
            out.append(Selection(name, group, label, tau, sweep[k], held_iv, bool(value <= bound + 1e-12)))
    return out


def _held_out_vector(frames: dict[str, pd.DataFrame], tau: float, router: bool) -> np.ndarray:
    pts = [point(f, tau, router) for f in frames.values()]
    llm = [f["llm_correct"].mean() for f in frames.values()]
    p = macro_point(pts)
    return np.array([p.pass_at_1, p.relative_cost, p.llm_pct, float(np.mean(llm)) - p.pass_at_1])


def _held_out(held: dict[str, pd.DataFrame], tau, router, n_boot, level, seed) -> dict[str, Interval]:
    keys = ("pass_at_1", "relative_cost", "llm_pct", "drop")
    value = _held_out_vector(held, tau, router)
    per_dataset = []
    for d, f in held.items():
        arrays = Arrays.of(f)

        def fn(i, arrays=arrays):
            sub = arrays.take(i)
            v = fast_values(sub, tau, router)
            return np.array([v[0], v[4], v[5], sub.llm_correct.mean() - v[0]])

        per_dataset.append(replicates(f["id"], fn, n_boot, dataset_seed(seed + 1, d)))
    reps = macro(per_dataset)
    return {k: interval(float(value[j]), reps[:, j], level) for j, k in enumerate(keys)}
