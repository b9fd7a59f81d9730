"""The evaluation report from saved records (no generation): ``report.md``, ``summary.json``, CSVs and plots.

``summary.json``: {"systems": {system: {group: {pass_at_1, avg_cost, slm_cost, llm_cost, relative_cost, llm_pct,
ece, auroc, brier, aurc, selective_accuracy_50/_80, ... and *_ci intervals}}}, "datasets": the same per dataset, "llm": the LLM-only reference,
"threshold": {"rule", "by_dataset"}, "metrics": per confidence source, "threshold_selection": [...],
"sweeps": per system and group, "absent_systems": [...]}. Costs are per query in SLM input-token units;
relative_cost is a fraction of the LLM-only cost; llm_pct a percentage; NaN is written as null.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from corea.cost import QWEN_32B_OVER_7B, CascadePoint, thresholds
from corea.evaluate.cascade import (
    SYSTEMS,
    Selection,
    SystemResult,
    default_thresholds,
    evaluate_system,
    join_systems,
    llm_only,
    select_thresholds,
)
from corea.evaluate.config import MetricsConfig, SelectionConfig
from corea.evaluate.paper_tables import findings, table_one, table_two
from corea.evaluate.records import load_records
from corea.evaluate.tables import DATASET_LABELS, MetricRow, metric_rows, ordered_groups, source_frames
from corea.evaluate.tables import scope_label as _label


@dataclass
class ReportData:
    """Everything the report shows, computed from records."""

    records: pd.DataFrame
    datasets: list[str]
    groups: dict[str, list[str]]
    threshold_rule: float | str
    thresholds: dict[str, float]
    size_ratio: float
    sweep_taus: np.ndarray
    systems: dict[str, SystemResult]
    absent: list[str]
    llm: dict[str, CascadePoint]
    metrics: dict[str, list[MetricRow]]
    sources: dict[str, pd.DataFrame]
    selections: list[Selection] = field(default_factory=list)

    @property
    def scopes(self) -> list[str]:
        return list(self.groups)


def compute_report(
    records: pd.DataFrame | str | Path,
    *,
    size_ratio: float = QWEN_32B_OVER_7B,
    threshold: float | str = "llm_pass_at_1",
    sweep_step: float = 0.05,
    selection: SelectionConfig | None = None,
    metrics: MetricsConfig | None = None,
    seed: int = 0,
) -> ReportData:
    """All tables' numbers: metrics per source, cascade per system, threshold selection."""
    records = load_records(records)
    selection = selection or SelectionConfig()
    metrics = metrics or MetricsConfig()
    datasets = list(dict.fromkeys(records["dataset"]))
    order = {d: i for i, d in enumerate(DATASET_LABELS)}
    datasets.sort(key=lambda d: (ordered_groups(records["group"].unique()).index(_group(records, d)), order.get(d, 99), d))
    groups: dict[str, list[str]] = {}
    for d in datasets:
        groups.setdefault(_group(records, d), []).append(d)
    taus = default_thresholds(records, datasets, threshold)
    sweep_taus = thresholds(sweep_step)
    joined, absent = join_systems(records, size_ratio)
    boot = {"n_boot": metrics.n_boot, "level": metrics.level, "seed": seed}
    systems = {name: evaluate_system(name, j, taus, sweep_taus, **boot) for name, j in joined.items()}
    sources = source_frames(records, joined)
    table = {name: metric_rows(f, name, datasets, n_bins=metrics.n_bins, **boot) for name, f in sources.items()}
    selections = []
    if selection.enabled:
        for name, j in joined.items():
            selections += select_thresholds(name, j, selection.max_drops, selection.cost_budgets,
                                            selection.calibration_fraction, selection.step, **boot)
    return ReportData(records, datasets, groups, threshold, taus, size_ratio, sweep_taus, systems, absent,
                      llm_only(records, datasets, size_ratio), table, sources, selections)


def _group(records: pd.DataFrame, dataset: str) -> str:
    return str(records.loc[records["dataset"] == dataset, "group"].iloc[0])


# -------------------------------------------------------------------------------------------- json
def _clean(value):
    if isinstance(value, float) or isinstance(value, np.floating):
        return None if math.isnan(value) or math.isinf(value) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_clean(v) for v in value]
    return value


def _entry(data: ReportData, system: str, scope: str) -> dict:
    res = data.systems[system]
    p, ivs = res.at_default[scope], res.intervals[scope]
    out = {f: getattr(p, f) for f in ("pass_at_1", "avg_cost", "slm_cost", "llm_cost", "relative_cost", "llm_pct")}
    for f, iv in ivs.items():
        out[f"{f}_ci"] = [iv.low, iv.high]
    row = next(r for r in data.metrics[system] if r.scope == scope)
    for key in ("ece", "auroc", "confidence_output_ratio", "brier", "aurc", "selective_accuracy_50",
                "selective_accuracy_80"):
        out[key], out[f"{key}_ci"] = row.values[key].value, [row.values[key].low, row.values[key].high]
    out["slm_pass_at_1"], out["slm_pass_at_1_std"] = row.values["pass_at_1"].value, row.pass_at_1_std
    if scope in data.thresholds:
        out["threshold"] = data.thresholds[scope]
    return out


def summary(data: ReportData) -> dict:
    """The ``summary.json`` object (NaN as None)."""
    groups, datasets = data.scopes, data.datasets
    sweeps = {name: {scope: [{"threshold": p.threshold, "pass_at_1": p.pass_at_1, "relative_cost": p.relative_cost,
                              "avg_cost": p.avg_cost, "llm_pct": p.llm_pct} for p in res.sweeps[scope]]
                     for scope in groups if scope in res.sweeps}
              for name, res in data.systems.items()}
    out = {
        "systems": {name: {g: _entry(data, name, g) for g in groups if g in res.at_default}
                    for name, res in data.systems.items()},
        "datasets": {name: {d: _entry(data, name, d) for d in datasets if d in res.at_default}
                     for name, res in data.systems.items()},
        "llm": {scope: p.as_dict() for scope, p in data.llm.items()},
        "threshold": {"rule": data.threshold_rule, "by_dataset": data.thresholds},
        "size_ratio": data.size_ratio,
        "groups": data.groups,
        "absent_systems": data.absent,
        "metrics": {src: {r.scope: r.as_dict() for r in rows} for src, rows in data.metrics.items()},
        "threshold_selection": [s.as_dict() for s in data.selections],
        "sweeps": sweeps,
        "records": {m: int(n) for m, n in data.records["model"].value_counts().sort_index().items()},
    }
    return _clean(out)


# ---------------------------------------------------------------------------------------- markdown
def _pct(x: float, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def _num(x: float, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(iv, scale: float = 100.0, digits: int = 1) -> str:
    if iv is None or math.isnan(iv.value):
        return "–"
    if math.isnan(iv.low):
        return f"{scale * iv.value:.{digits}f}"
    return f"{scale * iv.value:.{digits}f} [{scale * iv.low:.{digits}f}, {scale * iv.high:.{digits}f}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def cascade_table(data: ReportData, scopes: list[str]) -> str:
    """Systems x scopes, each with Pass@1 (%), Cost (% of LLM-only) and LLM% at the default thresholds."""
    header = ["System"] + [f"{_label(s)} {k}" for s in scopes for k in ("Pass@1", "Cost", "LLM%")]
    rows = [["LLM only"] + [c for s in scopes for c in (
        (_pct(data.llm[s].pass_at_1), "100.0", "100.0") if s in data.llm else ("–",) * 3)]]
    for s in SYSTEMS:
        if s.name not in data.systems:
            continue
        res = data.systems[s.name]
        cells = [s.name]
        for scope in scopes:
            p = res.at_default.get(scope)
            cells += [_pct(p.pass_at_1), _pct(p.relative_cost), f"{p.llm_pct:.1f}"] if p else ["–"] * 3
        rows.append(cells)
    return _table(header, rows)


def cost_table(data: ReportData, scopes: list[str]) -> str:
    """Average cost per query split into SLM side (incl. the router) and LLM, in SLM input-token units."""
    header = ["System"] + [f"{_label(s)} {k}" for s in scopes for k in ("SLM", "LLM", "Total")]
    rows = [["LLM only"] + [c for s in scopes for c in (
        ("0", f"{data.llm[s].llm_cost:.0f}", f"{data.llm[s].avg_cost:.0f}") if s in data.llm else ("–",) * 3)]]
    for name, res in data.systems.items():
        cells = [name]
        for scope in scopes:
            p = res.at_default.get(scope)
            cells += [f"{p.slm_cost:.0f}", f"{p.llm_cost:.0f}", f"{p.avg_cost:.0f}"] if p else ["–"] * 3
        rows.append(cells)
    return _table(header, rows)


def interval_table(data: ReportData, scopes: list[str]) -> str:
    """Default-threshold pass@1, relative cost and LLM% with 95% question-bootstrap intervals."""
    header = ["System", "Scope", "Pass@1 (%)", "Cost (% of LLM)", "LLM%"]
    rows = []
    for name, res in data.systems.items():
        for scope in scopes:
            if scope not in res.intervals:
                continue
            iv = res.intervals[scope]
            rows.append([name, _label(scope), _ci(iv["pass_at_1"]),
                         _ci(iv["relative_cost"]), _ci(iv["llm_pct"], scale=1.0)])
    return _table(header, rows)


def metrics_table(data: ReportData, scopes: list[str]) -> str:
    """Confidence quality per source: pass@1 ± std over runs, ECE, AUROC, confidence output ratio, Brier,
    AURC and selective accuracy at 50% / 80% coverage (95% CI)."""
    header = ["Source", "Scope", "Pass@1 (%)", "± std", "ECE (%)", "AUROC (%)", "COR (%)", "Brier (%)",
              "AURC (%)", "Sel@50 (%)", "Sel@80 (%)"]
    rows = []
    for source, mrows in data.metrics.items():
        for r in mrows:
            if r.scope not in scopes:
                continue
            v = r.values
            rows.append([source, _label(r.scope), _ci(v["pass_at_1"]), _pct(r.pass_at_1_std), _ci(v["ece"]),
                         _ci(v["auroc"]), _ci(v["confidence_output_ratio"]), _ci(v["brier"]), _ci(v["aurc"]),
                         _ci(v["selective_accuracy_50"]), _ci(v["selective_accuracy_80"])])
    return _table(header, rows)


def selection_table(data: ReportData) -> str:
    header = ["System", "Group", "Target", "tau", "Held-out Pass@1 (%)", "Drop vs LLM (pts)", "Cost (% of LLM)",
              "LLM%", "Met"]
    rows = []
    for s in data.selections:
        if s.tau is None:
            rows.append([s.system, _label(s.group), s.target, "infeasible"] + ["–"] * 5)
            continue
        h = s.held_out
        rows.append([s.system, _label(s.group), s.target, f"{s.tau:.2f}", _ci(h["pass_at_1"]), _ci(h["drop"]),
                     _ci(h["relative_cost"]), _ci(h["llm_pct"], scale=1.0), "yes" if s.meets_target else "no"])
    return _table(header, rows)


def markdown(data: ReportData, plots: list[str]) -> str:
    groups = data.scopes
    counts = data.records.groupby(["model", "dataset"]).size().unstack(fill_value=0)[data.datasets]
    runs = int(data.records["run"].nunique())
    brief = summary(data)
    rule = ("the LLM's pass@1 on each dataset" if data.threshold_rule == "llm_pass_at_1"
            else f"tau = {data.threshold_rule}")
    parts = [
        "# COREA evaluation report",
        "",
        f"Records: {len(data.records)} rows, {runs} run(s) per question. Cost unit: one SLM input token; "
        f"C_SLM = n_in + 4 n_out, C_LLM = {data.size_ratio:.4g} (n_in + 4 n_out), router tokens at ratio 1. "
        f"Default threshold: {rule} "
        f"({', '.join(f'{_label(d)} {t:.3f}' for d, t in data.thresholds.items())}). Group values are macro means "
        "over the group's datasets. Intervals: 95% bootstrap over questions.",
        "",
        "Systems not shown (their model or baseline is not configured): " + (", ".join(data.absent) or "none") + ".",
        "",
        _table(["Model"] + [_label(d) for d in counts.columns],
               [[m] + [str(int(v)) for v in counts.loc[m]] for m in counts.index]),
        "",
        "## Table 1: pass@1 (%), average cost per query, its change vs LLM-only and LLM% per dataset group",
        "",
        table_one(brief),
        "",
        "## What this shows",
        "",
        findings(brief),
        "",
        "## Table 2: the same per dataset",
        "",
        table_two(brief),
        "",
        "## Table 3: default-threshold results with 95% intervals",
        "",
        interval_table(data, groups),
        "",
        "## Table 4: confidence quality",
        "",
        metrics_table(data, groups),
        "",
        "## Average cost per query (SLM input-token units)",
        "",
        cost_table(data, groups),
        "",
    ]
    if data.selections:
        parts += ["## Threshold selection (tau chosen on the calibration split, reported on the held-out split)",
                  "", selection_table(data), ""]
    parts += ["## Appendix: per-dataset results", ""]
    for g, members in data.groups.items():
        parts += [f"### {_label(g)}", "", cascade_table(data, members), "", cost_table(data, members), "",
                  metrics_table(data, members), ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(parts)


def build_report(
    records: pd.DataFrame | str | Path,
    out_dir: str | Path,
    *,
    size_ratio: float = QWEN_32B_OVER_7B,
    threshold: float | str = "llm_pass_at_1",
    sweep_step: float = 0.05,
    selection: SelectionConfig | None = None,
    metrics: MetricsConfig | None = None,
    seed: int = 0,
    plots: bool = True,
    strategies: pd.DataFrame | None = None,
) -> Path:
    """Write ``report.md``, ``summary.json``, ``metrics.csv``, ``sweeps.csv`` and the plots into ``out_dir``;
    with ``strategies`` (``corea.evaluate.online`` rows) also their table, Pareto and LLM-call-position plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = compute_report(records, size_ratio=size_ratio, threshold=threshold, sweep_step=sweep_step,
                          selection=selection, metrics=metrics, seed=seed)
    written = []
    if plots:
        from corea.evaluate.plots import write_plots

        written = write_plots(data, out)
    summary_data, strategy_md = summary(data), ""
    if strategies is not None and len(strategies):
        strategy_md, summary_data["strategies"], more = strategy_section(data, strategies, out, plots, seed,
                                                                         metrics.n_boot if metrics else 1000)
        written += more
    (out / "summary.json").write_text(json.dumps(summary_data, indent=2, allow_nan=False))
    pd.DataFrame([r.as_dict() for rows in data.metrics.values() for r in rows]).to_csv(out / "metrics.csv", index=False)
    pd.DataFrame([{"system": n, "scope": s, **p.as_dict()} for n, res in data.systems.items()
                  for s, pts in res.sweeps.items() for p in pts]).to_csv(out / "sweeps.csv", index=False)
    (out / "report.md").write_text(markdown(data, written) + strategy_md)
    return out


def strategy_table(rows: list[dict], llm_only: str = "LLM only") -> str:
    """Held-out pass@1 (95% interval) and the three relative costs of the collaboration strategies."""
    header = ["System", "tau", "Questions", "Pass@1 (%)", "Cost (% of LLM)", "Cached cost (%)", "FLOPs (%)",
              "LLM share (%)"]
    body = [[r["system"], _num(r["threshold"], 2), str(r["questions"]),
             f"{_pct(r['pass_at_1'])} [{_pct(r['pass_at_1_low'])}, {_pct(r['pass_at_1_high'])}]",
             _pct(r["cost_rel"]), _pct(r["cost_rel_cached"]), _pct(r["flops_rel"]), _pct(r["llm_share"])]
            for r in rows]
    return _table(header, body)


def strategy_notes_md(rows: list[dict]) -> str:
    """The strategies' notes (why an operating point is an edge or costs more than LLM-only) as a list."""
    return "\n".join(f"- {r['system']}, {r['note']}" for r in rows if r.get("note"))


def strategy_section(data: ReportData, frame: pd.DataFrame, out: Path, plots: bool, seed: int, n_boot: int
                     ) -> tuple[str, list[dict], list[str]]:
    """(markdown, summary rows, plot paths) of the online strategies (``corea.evaluate.online``)."""
    from corea.evaluate.online import strategy_summary

    rows = [{k: _clean(v) for k, v in r.items()} for r in strategy_summary(frame, n_boot=n_boot, seed=seed)]
    frame.to_csv(out / "strategies.csv", index=False)
    written = []
    if plots:
        from corea.evaluate.plots import llm_call_positions, strategy_pareto

        written = [strategy_pareto(data, frame, out / "strategies_pareto.png").name,
                   llm_call_positions(frame, out / "llm_call_positions.png").name]
    md = ["## Table 1 (continued): collaboration strategies, online, on their held-out split", "",
          "Each strategy ran on the models (it changes what they see, so it cannot be simulated from the records); "
          "tau was the cheapest on its calibration split within the configured pass@1 drop of LLM-only. Costs are "
          "relative to LLM-only on the same questions: the paper's token cost per call (a handoff pays its prefix "
          "again), the prefix-cached variant (cached input at 0.1x) and FLOPs (2 x params x uncached tokens).", "",
          strategy_table(rows), ""]
    if strategy_notes_md(rows):
        md += [strategy_notes_md(rows), ""]
    if written:
        md += [f"![{Path(p).stem}]({Path(p).name})" for p in written] + [""]
    return "\n".join(md), rows, written
