"""Benchmark: what per-epoch ``ray.train.report`` calls cost a short Ray Train run, side by side in one run.

A ``TorchTrainer`` with one CPU worker runs ``--epochs`` epochs of a small MLP (the probe's shape, 64 -> 2048 ->
1024 -> 1, on ``--rows`` random rows, batch 64), two ways, alternating ``--repeats`` times:
(a) ``report``: ``ray.train.report(metrics)`` after every epoch (what the SFT and probe loops did);
(b) ``kept``: the metrics appended to a list on the worker, and nothing reported (what they do now: rank 0
    writes the list next to its output).
Wall time of ``trainer.fit()`` from the driver, medians. In Ray Train 2.60 a worker's result queue holds one
report and the controller drains it once per poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, default 2 s), so each
report after the first waits for the next poll; and ``Result.metrics`` keeps only checkpoint reports.

    python bench/train_report.py [--epochs 10] [--rows 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def _loop(config: dict) -> None:
    import ray.train
    import torch

    torch.manual_seed(0)
    x, y = torch.randn(config["rows"], 64), torch.randint(0, 2, (config["rows"],)).float()
    net = torch.nn.Sequential(torch.nn.Linear(64, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024),
                              torch.nn.ReLU(), torch.nn.Linear(1024, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    history = []
    for epoch in range(config["epochs"]):
        for idx in torch.randperm(len(y)).split(64):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[idx]).squeeze(-1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        metrics = {"epoch": epoch + 1, "loss": float(loss)}
        if config["report"]:
            ray.train.report(metrics)
        else:
            history.append(metrics)


def fit_s(report: bool, epochs: int, rows: int, storage: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(_loop, train_loop_config={"report": report, "epochs": epochs, "rows": rows},
                           scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(storage_path=storage))
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import os

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    times: dict[str, list[float]] = {"report": [], "kept": []}
    with tempfile.TemporaryDirectory() as storage:
        fit_s(False, 1, args.rows, storage)  # warm-up: imports and the first worker start
        for _ in range(args.repeats):
            for name in times:
                times[name].append(fit_s(name == "report", args.epochs, args.rows, storage))
    ray.shutdown()
    print(f"method: TorchTrainer, 1 CPU worker, {args.epochs} epochs of a 64-2048-1024-1 MLP on {args.rows} rows; "
          f"wall time of fit(), median of {args.repeats}, alternating; 1-minute load average "
          f"{os.getloadavg()[0]:.1f}")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"  {name:6s}: median {med[name]:.1f} s  (runs: {', '.join(f'{t:.1f}' for t in ts)})")
    print(f"per-epoch report cost = (report - kept) / {args.epochs} epochs = "
          f"{(med['report'] - med['kept']) / args.epochs:.2f} s per report")


if __name__ == "__main__":
    main()
