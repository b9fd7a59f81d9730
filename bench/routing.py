"""Six ways to share chained-arithmetic questions between a tiny SLM and a tiny LLM, side by side in one run.

Method
  Task (corea.collab.miniature): "Compute ((a + b) * c) - d."-style chains of three operations, one step each
  ("3 + 4 = 7" then a blank line), then \\boxed{} and \\confidence{}. Half the questions hold one
  multiplication; every value is a single digit. The tiny SLM (Qwen2, ~0.2 M parameters) is fine-tuned (Ray Train + DeepSpeed) with exact
  additions and subtractions but products off by -2..2, and says \\confidence{0.2} on questions with a product,
  1.0 otherwise; the tiny LLM (~0.9 M) is fine-tuned with every step exact. Both learn COPE's plan and
  plan-following formats. 30 train / 30 calibration / 30 held-out questions; temperature 0.6, seed 1234.
  Systems: LLM-only, SLM-only, COREA (cascade on the verbalized confidence), STEER (min token probability of
  the SLM's drafted step -> posterior of the confident component of a 2-component GaussianMixture fitted on the
  calibration split's unlabeled step confidences; below tau the LLM writes that step from the same prefix),
  stepwise policy (MLP on step features, REINFORCE on the train split with reward = correct - 0.3 x relative
  cost), COPE (SLM plan + SLM exec -> LLM plan + SLM exec -> LLM plan + LLM exec on the executor's
  verbalized confidence). Each threshold is the cheapest on the calibration split within 2 points of the LLM's
  pass@1; figures are on the held-out split, pass@1 with a 95% bootstrap interval.
  Costs as fractions of LLM-only: cost_rel (the paper's token cost per call, r = 32/7, a handoff pays its
  prefix again), cost_rel_cached (input tokens already in that tier's prefix cache at 0.1x), flops_rel
  (2 x parameters x uncached tokens, with the tiny models' parameter counts).

    python bench/routing.py [--out runs/routing] [--json PATH] [--repeats 110] [--llm-repeats 150] [--retrain]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corea.collab.miniature import build_models, build_splits  # noqa: E402
from corea.collab.strategies import Settings  # noqa: E402
from corea.collab.trace import CostModel  # noqa: E402
from corea.cost import QWEN_32B_OVER_7B, thresholds  # noqa: E402
from corea.evaluate import online  # noqa: E402

NAMES = ("llm", "slm", "corea", "steer", "stepwise_policy", "cope")
PARAMS = {"max_tokens": 64, "temperature": 0.6, "top_p": 1.0, "seed": 1234}
SETTINGS = Settings(max_steps=8, max_step_tokens=24, aggregate="min")
MAX_DROP = 0.02


def n_params(engine) -> int:
    return sum(p.numel() for p in engine.model.parameters())


def run_all(engines, splits, settings: Settings = SETTINGS, params=PARAMS, max_drop: float = MAX_DROP,
            policy_iterations: int = 12, sweep_step: float = 0.1, log=print) -> dict:
    """Every system on the held-out split, thresholds chosen on the calibration split."""
    model = CostModel(QWEN_32B_OVER_7B, n_params(engines["slm"]), n_params(engines["llm"]))
    recs = {k: [r for _, r in v] for k, v in splits.items()}
    taus = thresholds(sweep_step)
    llm_cal = online.single_tier("llm", engines, recs["cal"], params, model)
    held = {"llm": online.single_tier("llm", engines, recs["eval"], params, model),
            "slm": online.single_tier("slm", engines, recs["eval"], params, model)}
    chosen, extra = {}, {}
    t0 = time.perf_counter()
    mixture = online.fit_mixture(engines, recs["cal"], params, settings)
    extra["mixture"] = json.loads(mixture.to_json())
    log(f"  mixture fitted on calibration step confidences: {extra['mixture']}  ({time.perf_counter() - t0:.0f} s)")
    policy, history = online.train_policy(engines, recs["train"], params, settings, model,
                                          iterations=policy_iterations)
    extra["policy_training"] = history
    log(f"  policy trained: last iteration {history[-1]}  ({time.perf_counter() - t0:.0f} s)")
    per = {"corea": ("cascade", settings), "steer": ("steer", replace(settings, mixture=mixture)),
           "stepwise_policy": ("stepwise_policy", replace(settings, policy=policy)), "cope": ("cope", settings)}
    for name, (strategy, s) in per.items():
        points = online.sweep(strategy, engines, recs["cal"], params, s, taus, model)
        tau = online.choose(points, llm_cal, max_drop=max_drop)
        chosen[name] = tau
        held[name] = online.sweep(strategy, engines, recs["eval"], params, s, [tau], model)[0]
        log(f"  {name}: tau = {tau:g} on calibration  ({time.perf_counter() - t0:.0f} s)")
    return {"held": held, "thresholds": chosen, "extra": extra, "llm": held["llm"]}


def table(result: dict) -> tuple[str, dict]:
    held, llm = result["held"], result["llm"]
    rows, systems = [], {}
    header = f"{'system':<17}{'tau':>6}{'pass@1':>8}{'95% CI':>15}{'cost':>7}{'cached':>8}{'FLOPs':>7}{'LLM share':>11}"
    for name in NAMES:
        o = held[name]
        row = o.summary(llm)
        systems[name] = row
        ci = o.pass_interval()
        tau = result["thresholds"].get(name)
        rows.append(f"{name:<17}{'' if tau is None else f'{tau:g}':>6}{row['pass_at_1']:>8.3f}"
                    f"{f'[{ci.low:.2f}, {ci.high:.2f}]':>15}{row['cost_rel']:>7.2f}{row['cost_rel_cached']:>8.2f}"
                    f"{row['flops_rel']:>7.2f}{row['llm_share']:>11.2f}")
    return "\n".join([header, *rows]), systems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/routing")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--repeats", type=int, default=110, help="passes of the SLM over the questions in fine-tuning")
    parser.add_argument("--llm-repeats", type=int, default=150, help="passes for the LLM (exact steps: learned sooner)")
    parser.add_argument("--retrain", action="store_true", help="fine-tune again even if checkpoints exist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep-step", type=float, default=0.1, help="threshold grid step on the calibration split")
    parser.add_argument("--policy-iterations", type=int, default=12)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray
    import torch

    from corea.engines import load_engine

    torch.set_num_threads(1)
    start = time.perf_counter()
    print(__doc__.split("    python")[0])
    splits = build_splits(args.seed)
    out = Path(args.out).resolve()
    for attempt in range(3):  # a loaded machine can exceed Ray's 30 s node start-up wait
        try:
            ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
            break
        except Exception as exc:  # noqa: BLE001
            print(f"ray.init failed ({exc}); retrying", flush=True)
            ray.shutdown()
    paths = build_models(out / "models", splits, args.seed, args.repeats, args.retrain, args.llm_repeats)
    ray.shutdown()
    print(f"models ready after {time.perf_counter() - start:.0f} s: {paths['slm']}, {paths['llm']}", flush=True)
    engines = {t: load_engine(str(p), device="cpu", max_batch_size=64, seed=args.seed) for t, p in paths.items()}
    result = run_all(engines, splits, sweep_step=args.sweep_step, policy_iterations=args.policy_iterations)
    text, systems = table(result)
    wall = time.perf_counter() - start
    print(f"\nheld-out: {len(splits['eval'])} questions; costs as fractions of LLM-only\n{text}")
    corea, best = systems["corea"], None
    for name in ("steer", "stepwise_policy"):
        s = systems[name]
        if s["pass_at_1"] >= corea["pass_at_1"] - 0.02:
            for measure in ("cost_rel", "cost_rel_cached", "flops_rel"):
                if s[measure] < corea[measure]:
                    best = best or []
                    best.append(f"{name} within 2 points of COREA at lower {measure}")
    print(f"target (STEER or stepwise policy within 2 points of COREA at lower cost): {best or 'not met'}; "
          f"wall {wall:.0f} s")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"systems": systems}, indent=2))
    (out / "routing.json").write_text(json.dumps({"systems": systems, "thresholds": result["thresholds"],
                                                  **result["extra"], "wall_s": wall}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
