"""Seconds per RLCC step with rollouts pipelined ahead of training (``rollout.max_staleness: 1``) against the
synchronous loop (``max_staleness: 0``), side by side in one run.

Method: the tiny config (``configs/tiny-cpu-rlcc.yaml``: tiny Qwen2 'slm' built on the spot, the DeepMath sample,
L1 RLCC reward), one rollout worker and one DeepSpeed rank each given 1 Ray CPU (so Ray starts them with
``OMP_NUM_THREADS=1``: one torch thread each, and the two can run on the two cores at once), reference and reward
actors at 0.25 CPU. Responses are long enough (``--max-tokens``, the random tiny model rarely stops early) that
generation takes at least 40% of a synchronous step, as on GPUs where generation dominates an RL step. Both runs
use the same seed, prompts and settings and run one after the other, each on a fresh local Ray cluster
(``ray.init(address="local", num_cpus=4)``: logical CPUs so that both placements fit). A step's time is the
row's ``time/step_s`` (wall time of the loop body: taking the batch, reference, train, weight sync); the first
``--warmup`` steps are left out; no checkpoints until the last step, no TensorBoard.
Split: ``time/rollout_s`` is the driver's wait for the batch (in the synchronous loop, all of generation; in the
pipelined one the wait for a batch still generating shows mostly in ``sync_s``, as the weight update queues
behind that generation on the rollout worker); overlap = (sync step - async step) / sync generation: the share
of generation hidden behind training.

    python bench/async_step.py [--steps 12] [--warmup 2] [--max-tokens 224] [--micro-batch 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

PARTS = ("rollout", "reward", "reference", "train", "sync")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def run(staleness: int, args, work: Path) -> dict:
    import ray

    from corea.train.config import load_config
    from corea.train.loop import METRICS_FILE, train

    steps = args.warmup + args.steps
    cfg = load_config(args.config, {
        "name": f"bench-async-{staleness}",
        "rollout.max_staleness": staleness,
        "rollout.max_tokens": args.max_tokens,
        "rollout.prompts_per_step": args.prompts,
        "rollout.n": args.n,
        "optim.train_batch_prompts": args.prompts,
        "optim.micro_batch_size": args.micro_batch,
        "optim.steps": steps,
        "resources.rollout_cpus": 1,
        "resources.trainer_cpus": 1,
        "resources.reference_cpus": 0.25,
        "resources.reward_cpus": 0.25,
        "output.dir": str(work / f"staleness{staleness}"),
        "output.checkpoint_every": 10**9,
        "output.tensorboard": False,
        "output.log_every": 10**9,
    })
    before = uptime()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    start = time.perf_counter()
    try:
        train(cfg, progress=False)
    finally:
        total = time.perf_counter() - start
        ray.shutdown()
    rows = [json.loads(line) for line in (cfg.out_dir / METRICS_FILE).read_text().splitlines()][args.warmup:]
    per_step = [r["time/step_s"] for r in rows]
    split = {p: statistics.fmean(r.get(f"time/{p}_s", 0.0) for r in rows) for p in PARTS}
    return {"max_staleness": staleness, "s_per_step": statistics.fmean(per_step), "median_s": statistics.median(per_step),
            "per_step_s": per_step, "split_s": split, "staleness": [r["staleness"] for r in rows],
            "response_length": statistics.fmean(r["response_length"] for r in rows), "total_run_s": total,
            "uptime_before": before, "uptime_after": uptime()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu-rlcc.yaml"))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    print(f"RLCC step time, synchronous (max_staleness 0) vs pipelined (max_staleness 1): tiny config, {args.prompts} "
          f"prompts x {args.n} responses, <= {args.max_tokens} new tokens, rollout worker and trainer 1 CPU / 1 thread "
          f"each; {args.warmup} warm-up + {args.steps} measured steps each; {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        sync = run(0, args, Path(tmp))
        pipelined = run(1, args, Path(tmp))
    gen_share = sync["split_s"]["rollout"] / sync["s_per_step"]
    result = {
        "setup": {k: v for k, v in vars(args).items() if k != "json"},
        "sync_s_per_step": sync["s_per_step"],
        "async_s_per_step": pipelined["s_per_step"],
        "speedup": sync["s_per_step"] / pipelined["s_per_step"],
        "generation_share_of_sync_step": gen_share,
        "overlap": (sync["s_per_step"] - pipelined["s_per_step"]) / sync["split_s"]["rollout"],
        "sync": sync,
        "async": pipelined,
    }
    for name, r in (("sync  (max_staleness 0)", sync), ("async (max_staleness 1)", pipelined)):
        split = ", ".join(f"{k} {v:.3f}" for k, v in r["split_s"].items())
        print(f"\n{name}: {r['s_per_step']:.3f} s/step mean, {r['median_s']:.3f} median; split: {split}; "
              f"response length {r['response_length']:.0f}; staleness {sorted(set(r['staleness']))}")
        print(f"  before: {r['uptime_before']}\n  after:  {r['uptime_after']}")
    print(f"\ngeneration = {gen_share:.0%} of a synchronous step; overlap (generation hidden behind training) "
          f"{result['overlap']:.0%}; steps per second async / sync = {result['speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
