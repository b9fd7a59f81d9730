"""Online evaluation of the collaboration strategies: they change what the models see (a handed-over prefix, a
plan), so unlike the query-level cascade they cannot be simulated from independent SLM / LLM records.

For a strategy, a question set and a threshold tau: run every question through the strategy
(``corea.collab.strategies`` over in-process engines, batched), grade the final answers, and report
    pass@1, cost_rel = mean cost / mean C_LLM-only, cost_rel_cached (prefix cache), flops_rel, llm_share
(llm_share: mean share of a trace's accepted calls written by the LLM). Thresholds are chosen on a calibration
split for a target (largest pass@1 drop vs the LLM, or a cost budget) and reported on the held-out split with
a bootstrap interval over questions.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from corea import grading, metrics
from corea.collab.mixture import StepMixture
from corea.collab.policy import StepPolicy, calibrate_threshold
from corea.collab.strategies import Settings, run, stepwise_policy
from corea.collab.cache import CachedTiers
from corea.collab.tiers import EngineTiers, Tiers
from corea.collab.trace import Call, CostModel, Trace
from corea.data import Record

log = logging.getLogger(__name__)
SYSTEM_FIELDS = ("pass_at_1", "cost_rel", "cost_rel_cached", "flops_rel", "llm_share")


def cached_tiers(engines: dict) -> CachedTiers:
    """The two engines behind one generation cache (``corea.collab.cache``): pass it wherever ``engines`` goes
    and every later sweep, training iteration or run reuses the steps already generated."""
    return CachedTiers(lambda: EngineTiers(engines["slm"], engines["llm"]))


def tiers_of(engines) -> Tiers:
    """``engines``: {"slm", "llm"} engines (batched, uncached) or a ``Tiers`` object such as ``cached_tiers``."""
    return engines if hasattr(engines, "step") else EngineTiers(engines["slm"], engines["llm"])


def run_traces(strategy: str, engines, records: Sequence[Record], params: dict, s: Settings,
               explore: np.random.Generator | None = None) -> list[Trace]:
    """Every record through ``strategy``, concurrently (the engine calls are batched). With ``explore`` the
    stepwise policy samples its actions, each record from its own child generator of ``explore`` (so the
    draws do not depend on the order in which the concurrent traces reach their decisions)."""
    tiers = tiers_of(engines)
    rngs = explore.spawn(len(records)) if explore is not None else None

    async def main():
        if strategy in ("slm", "llm"):
            return await asyncio.gather(*(single(tiers, strategy, r.messages(), params) for r in records))
        if explore is not None:
            return await asyncio.gather(*(stepwise_policy(tiers, r.messages(), params, s, explore=g)
                                          for r, g in zip(records, rngs)))
        return await asyncio.gather(*(run(strategy, tiers, r.messages(), params, s) for r in records))

    return list(asyncio.run(main()))


async def single(tiers, tier: str, messages, params) -> Trace:
    """One tier alone: its one answer (SLM-only, LLM-only)."""
    trace = Trace(tier, None)
    out = await tiers.answer(tier, messages, params)
    trace.add(Call(tier, "answer", out.prompt_tokens, out.completion_tokens, out.text), "")
    trace.text = out.text
    return trace


def grade_traces(traces: Sequence[Trace], records: Sequence[Record]) -> np.ndarray:
    """Correctness of each trace's whole text, as ``corea.grading`` decides it (math-verify on the response)."""
    verdicts = grading.grade_groups([([t.text or ""], r.gold, r.kind) for t, r in zip(traces, records)])
    return np.array([v[0] for v in verdicts], dtype=float)


@dataclass
class Outcome:
    """Per-question results of one strategy at one threshold."""

    strategy: str
    threshold: float | None
    correct: np.ndarray
    cost: np.ndarray
    cost_cached: np.ndarray
    flops: np.ndarray
    llm_share: np.ndarray
    traces: list[Trace] = field(default_factory=list, repr=False)

    def summary(self, llm_only: "Outcome") -> dict[str, float]:
        return {"pass_at_1": float(self.correct.mean()),
                "cost_rel": float(self.cost.mean() / llm_only.cost.mean()),
                "cost_rel_cached": float(self.cost_cached.mean() / llm_only.cost_cached.mean()),
                "flops_rel": float(self.flops.mean() / llm_only.flops.mean()),
                "llm_share": float(self.llm_share.mean())}

    def pass_interval(self, n_boot: int = 1000, seed: int = 0) -> metrics.Interval:
        return metrics.pass_at_1_ci(self.correct, n_boot=n_boot, seed=seed)


def outcome(strategy: str, tau: float | None, traces: list[Trace], records, model: CostModel) -> Outcome:
    costs = [t.costs(model) for t in traces]
    return Outcome(strategy, tau, grade_traces(traces, records), *(np.array([c[k] for c in costs])
                   for k in ("cost", "cost_cached", "flops")), np.array([t.llm_share() for t in traces]), traces)


def single_tier(tier: str, engines, records, params, model: CostModel) -> Outcome:
    """SLM-only or LLM-only: one answer per question."""
    traces = run_traces(tier, engines, records, params, Settings())
    return outcome(tier, None, traces, records, model)


def sweep(strategy: str, engines, records, params, s: Settings, taus: Sequence[float], model: CostModel
          ) -> list[Outcome]:
    return [outcome(strategy, float(t), run_traces(strategy, engines, records, params, replace(s, threshold=float(t))),
                    records, model) for t in taus]


def choose(points: Sequence[Outcome], llm_only: Outcome, max_drop: float | None = None,
           budget: float | None = None) -> float | None:
    """tau on a calibration sweep for a target (``corea.collab.policy.calibrate_threshold``)."""
    rows = [p.summary(llm_only) for p in points]
    return calibrate_threshold([p.threshold for p in points], [r["pass_at_1"] for r in rows],
                               [r["cost_rel"] for r in rows], float(llm_only.correct.mean()), max_drop, budget)


def fit_mixture(engines, records, params, s: Settings, seed: int = 0) -> StepMixture:
    """STEER's mixture, fitted on the SLM's step confidences of ``records`` with no handoff (unlabeled)."""
    traces = run_traces("steer", engines, records, params, replace(s, threshold=-1.0, mixture=None))
    conf = [c.confidence for t in traces for c in t.calls if c.role == "step" and c.confidence is not None]
    return StepMixture.fit(conf, seed=seed)


def train_policy(engines, records, params, s: Settings, model: CostModel, lam: float = 0.3, iterations: int = 12,
                 lr: float = 0.02, seed: int = 0, **training) -> tuple[StepPolicy, list[dict[str, float]]]:
    """REINFORCE on ``records`` (``corea.evaluate.policy_training``). The defaults are the cheap run of
    ``corea eval`` / ``corea demo``: one sampled trace per question per iteration, batch-mean baseline;
    ``training`` sets the rest of ``TrainingConfig`` (samples, baseline, returns, derived inputs, plateau)."""
    from corea.evaluate.policy_training import TrainingConfig, train

    cfg = TrainingConfig(lam=lam, iterations=iterations, lr=lr, seed=seed, **training)
    return train(engines, records, params, s, model, cfg)


def system_row(name: str, held: Outcome, llm_only: Outcome, n_boot: int = 1000) -> dict[str, Any]:
    ci = held.pass_interval(n_boot)
    return {"system": name, "threshold": held.threshold, **held.summary(llm_only),
            "pass_at_1_low": ci.low, "pass_at_1_high": ci.high}


def llm_call_positions(traces: Sequence[Trace]) -> list[int]:
    """Step indices at which the LLM wrote (accepted) a step: where in the trace it was called."""
    return [c.step for t in traces for c in t.calls if c.tier == "llm" and c.accepted and c.step is not None]


# ------------------------------------------------------------------------------ `corea eval` integration
STRATEGY_RECORDS_FILE = "strategy_records.parquet"
#: Under ``output_dir``: what ``corea serve`` needs to serve the strategies as evaluated (``serve_settings``).
STRATEGY_DIR = "strategies"
SYSTEM_NAMES = {"cascade": "COREA (online)", "steer": "STEER", "stepwise_policy": "Stepwise policy", "cope": "COPE"}


def split_questions(records: Sequence[Record], seed: int, train: float, cal: float) -> dict[str, list[Record]]:
    from corea.evaluate.records import split_key

    out = {"train": [], "cal": [], "eval": []}
    for r in records:
        k = split_key(seed + 1, r.dataset, r.id)  # independent of the report's own calibration split
        out["train" if k < train else "cal" if k < train + cal else "eval"].append(r)
    return out


def _rows(o: Outcome, records, llm: Outcome, split: str, max_drop: float) -> list[dict[str, Any]]:
    return [{"dataset": r.dataset, "id": r.id, "strategy": o.strategy, "split": split, "threshold": o.threshold,
             "correct": bool(y), "cost": c, "cost_cached": cc, "flops": f, "llm_share": s,
             "llm_only_correct": bool(ly), "llm_only_cost": lc, "llm_only_flops": lf, "max_drop": max_drop,
             "calls": json.dumps([{k: d[k] for k in ("tier", "role", "tokens", "prompt_tokens", "confidence",
                                                     "accepted")} | {"step": call.step}
                                  for d, call in zip(t.steps(), t.calls)])}
            for r, y, c, cc, f, s, ly, lc, lf, t in zip(records, o.correct, o.cost, o.cost_cached, o.flops,
                                                        o.llm_share, llm.correct, llm.cost, llm.flops, o.traces)]


def evaluate_strategies(cfg, paths: dict[str, str], questions: Sequence[Record]):
    """Per-question rows of every configured strategy: the calibration sweep and the held-out run at the
    chosen tau (``split`` = "cal" / "eval"), with per-call tiers in ``calls`` (JSON)."""
    import pandas as pd

    from corea.cost import thresholds
    from corea.engines import load_engine

    sc = cfg.strategies
    for role in (sc.slm, "llm"):
        if role not in paths:
            raise ValueError(f"strategies need models.{role}")
    opts = {**cfg.engine.options}
    engines = {t: load_engine(paths[role], cfg.engine.backend, **opts) for t, role in (("slm", sc.slm), ("llm", "llm"))}
    model = CostModel(cfg.cascade.size_ratio, *(sum(p.numel() for p in e.model.parameters()) if hasattr(e, "model")
                                                 else 1.0 for e in (engines["slm"], engines["llm"])))
    params = {"max_tokens": cfg.generation.max_tokens, "temperature": cfg.generation.temperature,
              "top_p": cfg.generation.top_p, "seed": cfg.seed}
    base = Settings(max_steps=sc.max_steps, max_step_tokens=sc.max_step_tokens, aggregate=sc.aggregate,
                    lookahead=sc.lookahead)
    engines = cached_tiers(engines)  # seeded sampling: the sweeps and the policy's training share the steps
    split = split_questions(questions, cfg.seed, sc.train_fraction, sc.calibration_fraction)
    if not split["cal"] or not split["eval"]:
        raise ValueError("strategies: the calibration or held-out split is empty (too few questions)")
    llm = {k: single_tier("llm", engines, split[k], params, model) for k in ("cal", "eval")}
    rows, chosen = [], {}
    out = Path(cfg.out_dir) / STRATEGY_DIR
    out.mkdir(parents=True, exist_ok=True)
    for name in sc.names:
        s = base
        if name == "steer":
            s = replace(base, mixture=fit_mixture(engines, split["cal"], params, base, seed=cfg.seed))
            _write(out / "steer_mixture.json", s.mixture.to_json())
        if name == "stepwise_policy":
            train = split["train"] or split["cal"]
            policy, _ = train_policy(engines, train, params, base, model, lam=sc.policy_lambda,
                                     iterations=sc.policy_iterations, seed=cfg.seed)
            s = replace(base, policy=policy)
            _write(out / "stepwise_policy.json", policy.to_json())
        points = sweep(name, engines, split["cal"], params, s, thresholds(sc.sweep_step), model)
        tau = choose(points, llm["cal"], max_drop=sc.max_drop)
        held = sweep(name, engines, split["eval"], params, s, [tau], model)[0]
        for p in points:
            rows += _rows(p, split["cal"], llm["cal"], "cal", sc.max_drop)
        rows += _rows(held, split["eval"], llm["eval"], "eval", sc.max_drop)
        chosen[name] = float(tau)
        log.info("strategy %s: tau %.2f, held-out %s", name, tau, held.summary(llm["eval"]))
    _write(out / "strategies.json", json.dumps(
        {"thresholds": chosen, "max_steps": sc.max_steps, "max_step_tokens": sc.max_step_tokens,
         "aggregate": sc.aggregate, "lookahead": sc.lookahead}, indent=1))
    return pd.DataFrame(rows)


def _write(path: Path, text: str) -> None:
    """Written whole or not at all (a temporary file renamed over ``path``)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def serve_settings(folder: str | Path) -> dict[str, Any]:
    """A serve config's ``strategies`` section from what ``evaluate_strategies`` wrote to ``folder``
    (``output_dir/strategies``): the calibrated thresholds, the step settings, and the STEER mixture and
    stepwise policy files."""
    folder = Path(folder)
    out: dict[str, Any] = json.loads((folder / "strategies.json").read_text())
    out["thresholds"] = {k: v for k, v in out["thresholds"].items() if k != "cascade"}
    for key, name in (("mixture_path", "steer_mixture.json"), ("policy_path", "stepwise_policy.json")):
        if (folder / name).exists():
            out[key] = str(folder / name)
    return out


def strategy_summary(frame, n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Held-out rows per (strategy, dataset group 'all'): pass@1 with a bootstrap interval and the three costs
    relative to LLM-only on the same questions."""
    from corea.evaluate.strategy_notes import notes

    out, why = [], notes(frame)
    held = frame[frame["split"] == "eval"]
    for name, g in held.groupby("strategy", sort=False):
        ci = metrics.pass_at_1_ci(g["correct"].to_numpy(float), n_boot=n_boot, seed=seed)
        out.append({"system": SYSTEM_NAMES.get(name, name), "strategy": name, "threshold": float(g["threshold"].iloc[0]),
                    "questions": len(g), "pass_at_1": ci.value, "pass_at_1_low": ci.low, "pass_at_1_high": ci.high,
                    "cost_rel": g["cost"].mean() / g["llm_only_cost"].mean(),
                    "cost_rel_cached": g["cost_cached"].mean() / g["llm_only_cost"].mean(),
                    "flops_rel": g["flops"].mean() / g["llm_only_flops"].mean(), "llm_share": g["llm_share"].mean(),
                    "note": why.get(name)})
    return out
