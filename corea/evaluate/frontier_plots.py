"""Plots of the stepwise policy's training and of the strategies' accuracy-cost frontiers (matplotlib, Agg).

``learning_curves``: per lambda, the training curve's mean reward, pass@1, cost_rel and LLM step share per
iteration. ``frontiers``: pass@1 against cost_rel over the threshold grid, one line per system (each policy
lambda, STEER, COREA's cascade), LLM-only and SLM-only as points, each system's calibrated operating point
starred.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

CURVE_FIELDS = (("reward", "mean reward"), ("pass_at_1", "pass@1"), ("cost_rel", "cost / LLM-only"),
                ("llm_step_share", "LLM share of steps"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(histories: Mapping[float, Sequence[Mapping[str, float]]], path: str | Path,
                    title: str = "stepwise policy: REINFORCE on the train split") -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVE_FIELDS), figsize=(4 * len(CURVE_FIELDS), 3.4))
    for lam, rows in histories.items():
        it = [r["iteration"] for r in rows]
        for ax, (key, _) in zip(axes, CURVE_FIELDS):
            ax.plot(it, [r[key] for r in rows], label=f"lambda {lam:g}")
    for ax, (_, label) in zip(axes, CURVE_FIELDS):
        ax.set_xlabel("iteration")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frontiers(lines: Mapping[str, Sequence[Mapping[str, float]]], points: Mapping[str, tuple[float, float]],
              chosen: Mapping[str, tuple[float, float]], path: str | Path, title: str = "held-out frontier",
              target: tuple[float, float] | None = None) -> Path:
    """``lines``: name -> rows with cost_rel and pass_at_1 (one per threshold); ``points``: name -> (cost,
    pass@1) of single systems; ``chosen``: name -> the calibrated operating point; ``target``: (LLM pass@1,
    max drop) drawn as a band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = {}
    for name, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["cost_rel"])
        (line,) = ax.plot([r["cost_rel"] for r in rows], [r["pass_at_1"] for r in rows], marker=".", label=name,
                          alpha=0.85)
        colors[name] = line.get_color()
    for name, (c, p) in points.items():
        ax.scatter([c], [p], marker="s", s=50, zorder=3, label=name)
    for name, (c, p) in chosen.items():
        ax.scatter([c], [p], marker="*", s=220, zorder=4, color=colors.get(name, "black"), edgecolor="black",
                   label=f"{name} at calibrated tau")
    if target is not None:
        llm, drop = target
        ax.axhspan(llm - drop, llm, color="grey", alpha=0.15, label=f"within {drop * 100:g} points of LLM-only")
    ax.set_xlabel("cost / LLM-only cost (token cost)")
    ax.set_ylabel("pass@1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
