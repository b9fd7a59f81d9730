"""Report plots (matplotlib, Agg backend): Pareto curves, threshold curves, reliability diagrams, histograms,
risk-coverage curves.

Group curves are the macro means over the group's datasets at each threshold (as in the tables); reliability
diagrams, histograms and risk-coverage curves pool the rows of the group's datasets.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from corea.evaluate.tables import scope_label as _label  # noqa: E402
from corea.metrics import aurc, reliability_bins, risk_coverage  # noqa: E402

_COLORS = {"SLM-Verb": "#7f7f7f", "RLVR-SLM-Verb": "#1f77b4", "RLVR-SLM-AvgProb": "#17becf",
           "RLVR-SLM-Probe": "#9467bd", "Router + RLVR-SLM": "#8c564b", "Brier-SLM-Verb": "#ff7f0e",
           "COREA": "#d62728", "LLM": "#2ca02c"}


def _legend(fig, axes) -> None:
    """One legend for the whole figure, right of the panels, every series named once."""
    seen = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside right upper", fontsize=8)


def _percent_axis(ax) -> None:
    """Keep a percentage y axis within [0, 100] and at least 10 points tall (flat curves stay readable)."""
    lo, hi = ax.get_ylim()
    lo, hi = max(lo, 0.0), min(hi, 100.0)
    if hi - lo < 10:
        mid = (lo + hi) / 2
        lo = min(max(0.0, mid - 5), 90.0)
        hi = lo + 10
    pad = 0.03 * (hi - lo)  # curves lying on 0 or 100 stay visible
    ax.set_ylim(lo - pad, hi + pad)


def _empty(ax) -> None:
    ax.text(0.5, 0.5, "no confidence stated", transform=ax.transAxes, ha="center", va="center", color="0.4")


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def pareto(data, path: Path) -> Path:
    """pass@1 (%) against relative cost (% of LLM-only) over the threshold sweep, one panel per group."""
    groups = data.scopes
    fig = Figure(figsize=(4.8 * len(groups) + 2.2, 4.4), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, g in zip(axes, groups):
        for name, res in data.systems.items():
            pts = res.sweeps.get(g)
            if not pts:
                continue
            x = [100 * p.relative_cost for p in pts]
            y = [100 * p.pass_at_1 for p in pts]
            ax.plot(x, y, "-", lw=1.4, color=_COLORS.get(name), label=name, alpha=0.9)
            d = res.at_default[g]
            ax.plot(100 * d.relative_cost, 100 * d.pass_at_1, "o", color=_COLORS.get(name), ms=6, mec="black", mew=0.6)
        if g in data.llm:
            ax.plot(100, 100 * data.llm[g].pass_at_1, "*", color=_COLORS["LLM"], ms=14, mec="black", mew=0.6,
                    label="LLM only")
        ax.set_title(_label(g))
        ax.set_xlabel("cost (% of LLM-only)")
        ax.set_ylabel("pass@1 (%)")
        _percent_axis(ax)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    fig.suptitle("pass@1 vs cost over thresholds tau in [0, 1.1] (dots: default tau)")
    fig.savefig(path, dpi=120)
    return path


def threshold_curves(data, path: Path) -> Path:
    """pass@1 (%) and relative cost (% of LLM-only) against tau, one column per group."""
    groups = data.scopes
    fig = Figure(figsize=(4.8 * len(groups) + 2.2, 7.0), layout="constrained")
    axes = fig.subplots(2, len(groups), squeeze=False, sharex=True)
    for col, g in enumerate(groups):
        top, bottom = axes[0, col], axes[1, col]
        for name, res in data.systems.items():
            pts = res.sweeps.get(g)
            if not pts:
                continue
            taus = [p.threshold for p in pts]
            top.plot(taus, [100 * p.pass_at_1 for p in pts], color=_COLORS.get(name), label=name)
            bottom.plot(taus, [100 * p.relative_cost for p in pts], color=_COLORS.get(name), label=name)
        if g in data.llm:
            top.axhline(100 * data.llm[g].pass_at_1, color=_COLORS["LLM"], ls="--", lw=1, label="LLM only")
            bottom.axhline(100, color=_COLORS["LLM"], ls="--", lw=1, label="LLM only")
        top.set_title(_label(g))
        top.set_ylabel("pass@1 (%)")
        _percent_axis(top)
        bottom.set_ylabel("cost (% of LLM-only)")
        bottom.set_xlabel("threshold tau")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    _legend(fig, axes)
    fig.suptitle("pass@1 and cost against the threshold tau (LLM answers when confidence < tau)")
    fig.savefig(path, dpi=120)
    return path


def reliability(data, group: str, path: Path, n_bins: int = 10) -> Path:
    """Accuracy per confidence bin against the bin's confidence, one panel per confidence source."""
    sources = list(data.sources)
    rows, cols = _grid(len(sources), 4)
    fig = Figure(figsize=(3.4 * cols, 3.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, src in zip(axes, sources):
        frame = data.sources[src]
        frame = frame[frame["group"] == group]
        bins = reliability_bins(frame["score"].to_numpy(float), frame["correct"].to_numpy(bool), n_bins)
        centers = [(b.lower + b.upper) / 2 for b in bins]
        acc = [0.0 if b.count == 0 else b.accuracy for b in bins]
        ax.bar(centers, acc, width=1 / n_bins, edgecolor="black", lw=0.5, color=_COLORS.get(src, "#1f77b4"),
               alpha=0.75, label="accuracy")
        filled = [b for b in bins if b.count]
        ax.bar([(b.lower + b.upper) / 2 for b in filled], [b.confidence - b.accuracy for b in filled],
               bottom=[b.accuracy for b in filled], width=1 / n_bins, fill=False, edgecolor="#d62728", hatch="//",
               lw=0.6, label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.plot([b.confidence for b in filled], [b.accuracy for b in filled], "o", color="black", ms=3)
        n = sum(b.count for b in bins)
        if n == 0:
            _empty(ax)
        ax.set_title(f"{src}\n{n} of {len(frame)} rows with a confidence", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    for ax in axes[len(sources):]:
        ax.set_visible(False)
    fig.suptitle(f"Reliability diagrams: {_label(group)}")
    fig.savefig(path, dpi=110)
    return path


def histograms(data, group: str, path: Path, n_bins: int = 20) -> Path:
    """Confidence histograms, correct and wrong answers stacked, one panel per confidence source."""
    sources = list(data.sources)
    rows, cols = _grid(len(sources), 4)
    fig = Figure(figsize=(3.4 * cols, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    edges = np.linspace(0, 1, n_bins + 1)
    for ax, src in zip(axes, sources):
        frame = data.sources[src]
        frame = frame[frame["group"] == group]
        score = frame["score"].to_numpy(float)
        correct = frame["correct"].to_numpy(bool)
        keep = ~np.isnan(score)
        ax.hist([score[keep & correct], score[keep & ~correct]], bins=edges, stacked=True,
                color=["#2ca02c", "#d62728"], label=["correct", "wrong"], edgecolor="black", lw=0.3)
        if not keep.any():
            ax.set_ylim(0, 1)
            _empty(ax)
        ax.set_title(f"{src}\nno confidence: {int((~keep).sum())} of {len(frame)}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("responses")
    axes[0].legend(fontsize=8)
    for ax in axes[len(sources):]:
        ax.set_visible(False)
    fig.suptitle(f"Confidence histograms: {_label(group)}")
    fig.savefig(path, dpi=110)
    return path


def risk_coverage_curves(data, group: str, path: Path) -> Path:
    """Risk (error rate, %) of the most confident responses against coverage (%), every confidence source in
    one panel, its AURC in the legend (``corea.metrics.risk_coverage``; no confidence ranks last)."""
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    for src, frame in data.sources.items():
        frame = frame[frame["group"] == group]
        if frame.empty:
            continue
        score, correct = frame["score"].to_numpy(float), frame["correct"].to_numpy(bool)
        coverage, risk = risk_coverage(score, correct)
        ax.plot(100 * coverage, 100 * risk, lw=1.4, color=_COLORS.get(src),
                label=f"{src} (AURC {100 * aurc(score, correct):.1f})")
    ax.set_xlim(0, 100)
    ax.set_xlabel("coverage (%)")
    ax.set_ylabel("risk: error rate of the answered (%)")
    ax.set_title(f"Risk-coverage: {_label(group)}")
    _legend(fig, [ax])
    fig.savefig(path, dpi=110)
    return path


def write_plots(data, out: Path) -> list[str]:
    """All plots into ``out``; returns their file names."""
    out = Path(out)
    paths = []
    if data.systems:
        paths += [pareto(data, out / "pareto.png"), threshold_curves(data, out / "threshold.png")]
    if data.sources:
        for g in data.scopes:
            paths.append(reliability(data, g, out / f"reliability_{g}.png"))
            paths.append(histograms(data, g, out / f"confidence_hist_{g}.png"))
            paths.append(risk_coverage_curves(data, g, out / f"risk_coverage_{g}.png"))
    return [p.name for p in paths]


_STRATEGY_COLORS = {"cascade": "#d62728", "steer": "#e377c2", "stepwise_policy": "#bcbd22", "cope": "#17becf"}


def strategy_pareto(data, frame, path: Path) -> Path:
    """pass@1 (%) against cost (% of LLM-only) of the online strategies: their calibration sweep (line) and
    held-out point at the chosen tau (dot), beside the simulated cascades of the records (all questions)."""
    fig = Figure(figsize=(7.6, 4.6), layout="constrained")
    ax = fig.subplots()
    g = data.scopes[0] if data.scopes else None
    for name, res in data.systems.items():
        pts = res.sweeps.get(g) if g else None
        if pts:
            ax.plot([100 * p.relative_cost for p in pts], [100 * p.pass_at_1 for p in pts], "-", lw=1.0,
                    color=_COLORS.get(name), alpha=0.5, label=f"{name} (records)")
    for name, s in frame.groupby("strategy", sort=False):
        cal = s[s["split"] == "cal"].groupby("threshold")
        cost = cal["cost"].mean() / cal["llm_only_cost"].mean()
        ax.plot(100 * cost.to_numpy(), 100 * cal["correct"].mean().to_numpy(), "--", color=_STRATEGY_COLORS.get(name),
                label=f"{name} (calibration sweep)")
        held = s[s["split"] == "eval"]
        ax.plot(100 * held["cost"].mean() / held["llm_only_cost"].mean(), 100 * held["correct"].mean(), "o",
                color=_STRATEGY_COLORS.get(name), ms=7, mec="black", mew=0.6)
    ax.axvline(100, color=_COLORS["LLM"], lw=0.8, ls=":")
    ax.set(xlabel="cost (% of LLM-only)", ylabel="pass@1 (%)")
    _percent_axis(ax)
    ax.grid(alpha=0.3)
    _legend(fig, [ax])
    fig.suptitle(f"collaboration strategies: pass@1 vs cost (dots: held-out at the chosen tau; {_label(g) if g else ''})")
    fig.savefig(path, dpi=120)
    return path


def llm_call_positions(frame, path: Path) -> Path:
    """Where in the trace the LLM wrote: accepted LLM calls by step index, held-out split, per strategy."""
    import json

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    held = frame[frame["split"] == "eval"]
    names = list(dict.fromkeys(held["strategy"]))
    for k, name in enumerate(names):
        steps = [c.get("step") or 0 for calls in held.loc[held["strategy"] == name, "calls"]
                 for c in json.loads(calls) if c["tier"] == "llm" and c["accepted"]]
        counts = np.bincount(np.asarray(steps, dtype=int), minlength=1) if steps else np.zeros(1)
        width = 0.8 / max(1, len(names))
        ax.bar(np.arange(len(counts)) + k * width, counts / max(1, held["strategy"].eq(name).sum()), width,
               color=_STRATEGY_COLORS.get(name), label=name)
    ax.set(xlabel="step (stepwise) / stage (cope) index", ylabel="LLM calls per question")
    ax.grid(alpha=0.3, axis="y")
    if names:
        ax.legend(fontsize=8)
    fig.suptitle("where in the trace the LLM was called (held-out)")
    fig.savefig(path, dpi=120)
    return path
