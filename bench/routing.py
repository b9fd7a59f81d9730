"""Six ways to share chained-arithmetic questions between a tiny SLM and a tiny LLM, side by side in one run,
with the stepwise policy's learning curves and accuracy-cost frontier.

Method
  Task (corea.collab.miniature): "Compute ((a + b) * c) - d."-style chains of three operations, one step each
  ("3 + 4 = 7" then a blank line), then \\boxed{} and \\confidence{}. Half the questions hold one
  multiplication; every value is a single digit. The tiny SLM (Qwen2, ~0.2 M parameters) is fine-tuned (Ray
  Train + DeepSpeed) with exact additions and subtractions but products off by -2..2, and says \\confidence{0.2}
  on questions with a product, 1.0 otherwise; the tiny LLM (~0.9 M) is fine-tuned with every step exact. Both
  learn COPE's plan and plan-following formats. Splits: train (the policy), calibration (the mixture, every
  threshold and the policy's lambda), held-out (every figure). Greedy decoding (--temperature 0): the LLM
  writing every step then gives exactly LLM-only's answer, so a 2-point gap measures routing, not sampling
  luck (at temperature 0.6 two independent samplings of one model on 120 questions differ by a standard error
  of about 5 points). Every engine call goes through one generation cache: each distinct step is generated once.
  Systems: LLM-only, SLM-only, COREA (cascade on the verbalized confidence), STEER (min token probability of
  the SLM's drafted step -> posterior of the confident component of a 2-component GaussianMixture fitted on the
  calibration split's unlabeled step confidences; below tau the LLM writes that step from the same prefix),
  stepwise policy (MLP on step features + log p_min + STEER's posterior, REINFORCE on the train split with
  reward = correct - lambda x relative cost, K samples per question, leave-one-out baseline per question,
  returns to go, until the mean reward plateaus; one policy per lambda), COPE (SLM plan + SLM exec -> LLM plan
  + SLM exec -> LLM plan + LLM exec on the executor's verbalized confidence). Each threshold is the cheapest on
  the calibration split within 2 points of the LLM's pass@1 (for the policy, over every (lambda, tau)); its
  95% interval re-runs that choice on bootstrap resamples of the calibration questions. Figures are on the
  held-out split with 95% paired question-bootstrap intervals (pass@1, drop = LLM pass@1 - pass@1).
  Costs as fractions of LLM-only: cost_rel (the paper's token cost per call, r = 32/7, a handoff pays its
  prefix again), cost_rel_cached (input tokens already in that tier's prefix cache at 0.1x), flops_rel
  (2 x parameters x uncached tokens, with the tiny models' parameter counts). LLM share: the share of the
  answer's steps (calls) the LLM wrote.

    python bench/routing.py [--out runs/routing] [--json PATH] [--sizes 60,120,120] [--lambdas 0.02,0.04,0.06,0.08,0.12]
                            [--temperature 0] [--repeats 40] [--llm-repeats 60] [--retrain]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corea.collab.miniature import build_models, build_splits  # noqa: E402
from corea.collab.strategies import Settings  # noqa: E402
from corea.collab.trace import CostModel  # noqa: E402
from corea.cost import QWEN_32B_OVER_7B, thresholds  # noqa: E402
from corea.evaluate import online  # noqa: E402
from corea.evaluate.operating_point import Sweep, choose_index, frontier, held_out_intervals, threshold_interval  # noqa: E402
from corea.evaluate.policy_training import TrainingConfig, train_frontier  # noqa: E402

NAMES = ("llm", "slm", "corea", "steer", "stepwise_policy", "cope")
PARAMS = {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": 1234}
SETTINGS = Settings(max_steps=8, max_step_tokens=24, aggregate="min")
MAX_DROP = 0.02
MIN_SLM_STEPS = 0.30  # the goal: at least this share of steps kept on the SLM at the calibrated tau
LAMBDAS = (0.02, 0.04, 0.06, 0.08, 0.12)
POLICY = TrainingConfig(iterations=60, samples=8, baseline="loo", returns="to_go", lr=0.03,
                        derived=("log_min", "posterior"), entropy=0.01, plateau_window=5, plateau_tol=0.005,
                        min_iterations=15)
N_BOOT = 1000
FINE_TAUS = (0.975, 0.99)  # a trained policy's P(call LLM) crowds near 0 and 1


def n_params(engine) -> int:
    return sum(p.numel() for p in engine.model.parameters())


def calibrated(cal: Sweep, llm_cal, max_drop: float, n_boot: int = N_BOOT) -> dict:
    k = choose_index(cal, llm_cal.correct, llm_cal.cost, max_drop)
    iv = threshold_interval(cal, llm_cal.correct, llm_cal.cost, max_drop, n_boot)
    return {"index": k, "tau": float(cal.taus[k]), "tau_low": iv.low, "tau_high": iv.high,
            "cal_pass_at_1": float(cal.correct[k].mean()), "cal_cost_rel": float(cal.cost[k].sum() / llm_cal.cost.sum())}


def run_all(engines, splits, settings: Settings = SETTINGS, params=PARAMS, max_drop: float = MAX_DROP,
            lambdas=LAMBDAS, policy: TrainingConfig = POLICY, sweep_step: float = 0.05, n_boot: int = N_BOOT,
            log=print) -> dict:
    """Every system on the held-out split, thresholds (and the policy's lambda) chosen on the calibration split;
    threshold sweeps on both splits (the frontiers)."""
    tiers = online.cached_tiers(engines)
    model = CostModel(QWEN_32B_OVER_7B, *(n_params(engines[t]) for t in ("slm", "llm")))
    recs = {k: [r for _, r in v] for k, v in splits.items()}
    taus = np.union1d(thresholds(sweep_step), FINE_TAUS)
    t0 = time.perf_counter()
    llm = {k: online.single_tier("llm", tiers, recs[k], params, model) for k in ("cal", "eval")}
    held = {"llm": llm["eval"], "slm": online.single_tier("slm", tiers, recs["eval"], params, model)}
    mixture = online.fit_mixture(tiers, recs["cal"], params, settings)
    extra = {"mixture": json.loads(mixture.to_json())}
    log(f"  mixture fitted on calibration step confidences: {extra['mixture']}  ({time.perf_counter() - t0:.0f} s)")
    trained = train_frontier(tiers, recs["train"], params, replace(settings, mixture=mixture), model, lambdas,
                             policy, log_fn=log)
    extra["policy_training"] = {f"{lam:g}": h for lam, (_, h) in trained.items()}
    log(f"  policies trained for lambda in {list(lambdas)}  ({time.perf_counter() - t0:.0f} s)")
    per = {"corea": ("cascade", settings), "steer": ("steer", replace(settings, mixture=mixture)),
           "cope": ("cope", settings)}
    per |= {f"policy_{lam:g}": ("stepwise_policy", replace(settings, policy=p)) for lam, (p, _) in trained.items()}
    sweeps, chosen, fronts = {}, {}, {}
    for name, (strategy, s) in per.items():
        sweeps[name] = {k: online.sweep(strategy, tiers, recs[k], params, s, taus, model) for k in ("cal", "eval")}
        cal = Sweep.of(sweeps[name]["cal"])
        chosen[name] = calibrated(cal, llm["cal"], max_drop, n_boot)
        fronts[name] = {k: frontier(Sweep.of(sweeps[name][k]), llm[k].cost) for k in ("cal", "eval")}
        log(f"  {name}: tau = {chosen[name]['tau']:g} [{chosen[name]['tau_low']:g}, {chosen[name]['tau_high']:g}] on "
            f"calibration  ({time.perf_counter() - t0:.0f} s, {len(tiers)} distinct calls)")
    # the policy's operating point: the cheapest calibrated (lambda, tau) on the calibration split
    llm_cal_pass = float(llm["cal"].correct.mean())
    names = [f"policy_{lam:g}" for lam in trained]
    ok = [n for n in names if chosen[n]["cal_pass_at_1"] >= llm_cal_pass - max_drop - 1e-12]
    best = (min(ok, key=lambda n: (chosen[n]["cal_cost_rel"], -chosen[n]["cal_pass_at_1"])) if ok
            else max(names, key=lambda n: chosen[n]["cal_pass_at_1"]))
    chosen["stepwise_policy"] = {**chosen[best], "lambda": float(best.split("_")[1])}
    for name in ("corea", "steer", "cope", "stepwise_policy"):
        src = best if name == "stepwise_policy" else name
        held[name] = sweeps[src]["eval"][chosen[name]["index"]]
    intervals = {name: {k: vars(v) for k, v in held_out_intervals(
        held[name].correct, held[name].cost, held[name].llm_share, llm["eval"].correct, llm["eval"].cost,
        n_boot).items()} for name in NAMES}
    extra["cache"] = {"distinct_calls": len(tiers), "hits": getattr(tiers, "hits", 0),
                      "engine_s": getattr(tiers, "engine_s", 0.0)}
    return {"held": held, "chosen": chosen, "intervals": intervals, "frontiers": fronts, "extra": extra,
            "llm": llm["eval"], "llm_cal": llm["cal"], "policy_names": names}


def table(result: dict) -> tuple[str, dict]:
    held, llm = result["held"], result["llm"]
    rows, systems = [], {}
    header = (f"{'system':<17}{'tau':>6}{'tau 95% CI':>15}{'pass@1':>8}{'95% CI':>15}{'drop':>7}{'drop CI':>16}"
              f"{'cost':>7}{'cached':>8}{'FLOPs':>7}{'LLM share':>11}")
    for name in NAMES:
        row = held[name].summary(llm)
        c, iv = result["chosen"].get(name), result["intervals"][name]
        row |= {"threshold": c["tau"] if c else None, "tau_low": c["tau_low"] if c else None,
                "tau_high": c["tau_high"] if c else None, "lambda": (c or {}).get("lambda"),
                **{f"{k}_{e}": iv[k][e] for k in ("pass_at_1", "drop") for e in ("low", "high")},
                "drop": iv["drop"]["value"]}
        systems[name] = row
        tau = "" if c is None else f"{c['tau']:g}"
        tci = "" if c is None else f"[{c['tau_low']:.2f}, {c['tau_high']:.2f}]"
        pci = f"[{row['pass_at_1_low']:.2f}, {row['pass_at_1_high']:.2f}]"
        dci = f"[{row['drop_low']:+.2f}, {row['drop_high']:+.2f}]"
        rows.append(f"{name:<17}{tau:>6}{tci:>15}{row['pass_at_1']:>8.3f}{pci:>15}{row['drop']:>+7.3f}{dci:>16}"
                    f"{row['cost_rel']:>7.2f}{row['cost_rel_cached']:>8.2f}{row['flops_rel']:>7.2f}"
                    f"{row['llm_share']:>11.2f}")
    return "\n".join([header, *rows]), systems


def curve_table(histories: dict, every: int = 5) -> str:
    lines = [f"{'lambda':>7}{'iter':>6}{'reward':>9}{'pass@1':>8}{'cost':>7}{'LLM steps':>11}{'calls':>7}"]
    for lam, rows in histories.items():
        for r in rows:
            if r["iteration"] % every == 0 or r is rows[-1]:
                lines.append(f"{lam:>7}{r['iteration']:>6}{r['reward']:>+9.3f}{r['pass_at_1']:>8.3f}"
                             f"{r['cost_rel']:>7.2f}{r['llm_step_share']:>11.2f}{r['engine_calls']:>7}")
    return "\n".join(lines)


def frontier_table(result: dict, split: str = "eval") -> str:
    """Each system's distinct (pass@1, cost) points over the threshold grid."""
    lines = [f"{'system':<13}{'tau':>6}{'pass@1':>8}{'cost':>7}{'LLM share':>11}"]
    for name in (*result["policy_names"], "steer", "corea"):
        last = None
        for r in result["frontiers"][name][split]:
            key = (round(r["pass_at_1"], 6), round(r["cost_rel"], 6))
            if key != last:
                lines.append(f"{name:<13}{r['tau']:>6g}{r['pass_at_1']:>8.3f}{r['cost_rel']:>7.2f}{r['llm_share']:>11.2f}")
            last = key
    return "\n".join(lines)


def plots(result: dict, systems: dict, out: Path) -> list[Path]:
    from corea.evaluate.frontier_plots import frontiers, learning_curves

    hist = {float(k): v for k, v in result["extra"]["policy_training"].items()}
    lines = {n.replace("policy_", "policy lambda "): result["frontiers"][n]["eval"]
             for n in (*result["policy_names"], "steer", "corea")}
    lam = systems["stepwise_policy"]["lambda"]
    chosen = {f"policy lambda {lam:g}": (systems["stepwise_policy"]["cost_rel"], systems["stepwise_policy"]["pass_at_1"])}
    chosen |= {n: (systems[n]["cost_rel"], systems[n]["pass_at_1"]) for n in ("steer", "corea")}
    points = {"LLM-only": (1.0, systems["llm"]["pass_at_1"]), "SLM-only": (systems["slm"]["cost_rel"],
                                                                          systems["slm"]["pass_at_1"])}
    return [learning_curves(hist, out / "routing_learning.png"),
            frontiers(lines, points, chosen, out / "routing_frontier.png", "held-out: pass@1 against cost over tau",
                      (systems["llm"]["pass_at_1"], MAX_DROP))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/routing")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--sizes", default="60,120,120", help="train,calibration,held-out questions")
    parser.add_argument("--repeats", type=int, default=40, help="passes of the SLM over the questions in fine-tuning")
    parser.add_argument("--llm-repeats", type=int, default=60, help="passes for the LLM")
    parser.add_argument("--retrain", action="store_true", help="fine-tune again even if checkpoints exist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep-step", type=float, default=0.05, help="threshold grid step")
    parser.add_argument("--temperature", type=float, default=PARAMS["temperature"])
    parser.add_argument("--lambdas", default=",".join(f"{x:g}" for x in LAMBDAS))
    parser.add_argument("--policy-iterations", type=int, default=POLICY.iterations, help="at most; stops at a plateau")
    parser.add_argument("--policy-samples", type=int, default=POLICY.samples, help="sampled traces per question")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray
    import torch

    from corea.engines import load_engine

    torch.set_num_threads(1)
    start = time.perf_counter()
    print(__doc__.split("    python")[0])
    sizes = dict(zip(("train", "cal", "eval"), (int(x) for x in args.sizes.split(","))))
    splits = build_splits(args.seed, sizes=sizes)
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
    policy = replace(POLICY, iterations=args.policy_iterations, samples=args.policy_samples)
    result = run_all(engines, splits, params={**PARAMS, "temperature": args.temperature},
                     sweep_step=args.sweep_step, policy=policy,
                     lambdas=[float(x) for x in args.lambdas.split(",")])
    text, systems = table(result)
    hist = result["extra"]["policy_training"]
    print(f"\nlearning curves (train split, {sizes['train']} questions x {policy.samples} samples per iteration)\n"
          f"{curve_table(hist)}")
    print(f"\nfrontiers over tau (held-out, distinct points)\n{frontier_table(result)}")
    print(f"\nheld-out: {len(splits['eval'])} questions (calibration {len(splits['cal'])}); costs as fractions of "
          f"LLM-only; policy lambda {systems['stepwise_policy']['lambda']:g}\n{text}")
    sp, llm = systems["stepwise_policy"], systems["llm"]
    met = sp["pass_at_1"] >= llm["pass_at_1"] - MAX_DROP - 1e-12 and 1 - sp["llm_share"] >= MIN_SLM_STEPS
    out.mkdir(parents=True, exist_ok=True)
    figures = plots(result, systems, out)
    wall = time.perf_counter() - start
    print(f"goal (stepwise policy at its calibrated tau: >= {MIN_SLM_STEPS:.0%} of steps on the SLM, pass@1 within "
          f"{MAX_DROP * 100:g} points of LLM-only): {'met' if met else 'not met'} (SLM steps {1 - sp['llm_share']:.2f}, "
          f"drop {sp['drop']:+.3f}); plots {', '.join(str(f) for f in figures)}; cache {result['extra']['cache']}; "
          f"wall {wall:.0f} s")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"systems": systems}, indent=2))
    (out / "routing.json").write_text(json.dumps({"systems": systems, "chosen": result["chosen"],
                                                  "frontiers": result["frontiers"], **result["extra"],
                                                  "goal_met": met, "wall_s": wall}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
