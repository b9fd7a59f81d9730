"""Command line: ``corea train | eval | serve | demo``. Each is the same code as its ``ray_jobs/`` entrypoint."""

from __future__ import annotations

import argparse
import logging
import sys


def _train(args: argparse.Namespace) -> int:
    from corea.train.config import load_config
    from corea.train.loop import train

    cfg = load_config(args.config, dict(kv.split("=", 1) for kv in args.set))
    last = train(cfg, resume=args.resume)
    print(f"training finished; last checkpoint: {last}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import contextlib
    import os
    import time
    from pathlib import Path

    import torch

    if not torch.cuda.is_available():  # what DeepSpeed would detect, said before it is imported (no warning)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from corea.console import quiet
    from corea.demo.pipeline import FULL, QUICK, run_demo

    log_path = Path(args.out) / "logs" / "demo.log"
    if not args.verbose:
        print(f"corea demo: the demo's own lines here; Ray's, the libraries' and every warning in {log_path} "
              "(`corea -v demo`: everything here)", flush=True)
    with quiet(log_path) if not args.verbose else contextlib.nullcontext():
        run_demo(args.out, serve=not args.no_serve, steps=args.steps, port=args.port,
                 size=QUICK if args.quick else FULL)
        if not args.no_serve:
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print("stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corea", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="RLCC / RLVR training on Ray")
    p.add_argument("--config", required=True, help="training YAML (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output.dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.steps=4 (repeatable)")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="the miniature COREA pipeline end to end on a local Ray cluster")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--no-serve", action="store_true", help="stop after the report instead of serving the strategies")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps of each RL run (default 80; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="every stage on small subsets (a few minutes): a smoke test")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the served strategies")
    p.set_defaults(func=_demo)

    from corea.evaluate.cli import add_eval_parser
    from corea.integrations.reward_server_cli import add_reward_server_parser
    from corea.serve.cli import add_serve_parser

    add_eval_parser(sub)
    add_serve_parser(sub)
    add_reward_server_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"corea {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
