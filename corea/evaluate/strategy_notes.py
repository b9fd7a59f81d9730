"""Why a collaboration strategy's calibrated operating point looks the way it does, from its own figures.

Read from the per-question rows of ``corea.evaluate.online.evaluate_strategies``: the calibration sweep
(``split == "cal"``, one block of rows per tau) and the held-out run at the chosen tau (``split == "eval"``).
A note is written where a reader would stop: no threshold within the target (the most accurate one taken),
every step (or question) sent to the LLM, none sent, or a cost above LLM-only's. Percentages are of questions
(pass@1) or of LLM-only's token cost.
"""

from __future__ import annotations

import pandas as pd


def calibration_sweep(frame: pd.DataFrame, strategy: str) -> pd.DataFrame:
    """Per tau on the calibration split: pass@1, cost relative to LLM-only, mean LLM share."""
    cal = frame[(frame["split"] == "cal") & (frame["strategy"] == strategy)]
    return cal.groupby("threshold").apply(
        lambda g: pd.Series({"pass_at_1": g["correct"].mean(), "cost_rel": g["cost"].mean() / g["llm_only_cost"].mean(),
                             "llm_share": g["llm_share"].mean()}), include_groups=False).reset_index()


def note(frame: pd.DataFrame, strategy: str) -> str | None:
    """One sentence on why ``strategy``'s held-out point is an edge or costs more than LLM-only; None if it is
    neither (or the rows lack what it needs)."""
    held = frame[(frame["split"] == "eval") & (frame["strategy"] == strategy)]
    cal = frame[(frame["split"] == "cal") & (frame["strategy"] == strategy)]
    if held.empty or cal.empty or "llm_only_correct" not in frame:
        return None
    tau, share = float(held["threshold"].iloc[0]), float(held["llm_share"].mean())
    cost = held["cost"].mean() / held["llm_only_cost"].mean()
    max_drop = float(held["max_drop"].iloc[0])
    llm_cal = float(cal.drop_duplicates("id")["llm_only_correct"].mean())
    sweep = calibration_sweep(frame, strategy)
    target = llm_cal - max_drop
    reached = sweep[sweep["pass_at_1"] >= target - 1e-12]
    kept = sweep[sweep["llm_share"] < 0.999]  # thresholds that keep some work on the SLM
    parts = []
    if reached.empty:  # the most accurate tau was taken, wherever it sends the work
        best = sweep.loc[sweep["pass_at_1"].idxmax()]
        where = (", and it sends everything to the LLM" if share >= 0.999 else
                 ", and it never calls the LLM" if share <= 0.001 else f" (LLM share {100 * share:.0f}%)")
        parts.append(f"no tau came within {100 * max_drop:.0f} points of LLM-only's calibration pass@1 "
                     f"({100 * llm_cal:.1f}%; best {100 * best['pass_at_1']:.1f}% at tau {best['threshold']:.2f}), "
                     f"so the most accurate tau was taken{where}")
    elif share >= 0.999:
        best_kept = f"{100 * kept['pass_at_1'].max():.1f}%" if not kept.empty else "no such tau in the sweep"
        parts.append(f"only thresholds that send everything to the LLM came within {100 * max_drop:.0f} points of "
                     f"LLM-only's calibration pass@1 ({100 * llm_cal:.1f}%); those keeping work on the SLM "
                     f"reached at most {best_kept}")
    elif share <= 0.001:
        parts.append(f"the SLM alone was within {100 * max_drop:.0f} points of LLM-only on the calibration split "
                     f"({100 * reached['pass_at_1'].max():.1f}% vs {100 * llm_cal:.1f}%), so the cheapest tau "
                     f"never calls the LLM")
    if cost > 1.0 + 1e-9:
        parts.append(f"it costs {100 * cost:.0f}% of LLM-only because the SLM's drafts and plans are paid on top of "
                     f"the LLM's calls and every handoff pays the prompt and prefix again "
                     f"(LLM share {100 * share:.0f}%)")
    return f"tau {tau:.2f}: " + "; ".join(parts) + "." if parts else None


def notes(frame: pd.DataFrame) -> dict[str, str]:
    """strategy -> note, for the strategies that need one."""
    out = {}
    for strategy in dict.fromkeys(frame["strategy"]):
        text = note(frame, strategy)
        if text:
            out[strategy] = text
    return out
