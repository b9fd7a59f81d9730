"""``corea eval``: evaluation, cascade simulation and report (``ray_jobs/evaluate.py`` runs the same)."""

from __future__ import annotations

import argparse


def _eval(args: argparse.Namespace) -> int:
    from corea.evaluate.config import load_eval_config
    from corea.evaluate.run import evaluate, report_from_config

    overrides = dict(kv.split("=", 1) for kv in args.set)
    if args.out:
        overrides["output_dir"] = args.out
    cfg = load_eval_config(args.config, overrides)
    if args.records:
        report = report_from_config(args.records, cfg)
    else:
        report = evaluate(cfg)
    print(f"evaluation report: {report / 'report.md'}")
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on an argparse subparsers object; its handler is ``args.func``."""
    p = subparsers.add_parser("eval", help="evaluate SLMs and the LLM, simulate cascades, write the report")
    p.add_argument("--config", required=True, help="evaluation YAML (see configs/eval-*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set generation.runs=2 (repeatable)")
    p.add_argument("--out", default=None, help="output folder (overrides output_dir)")
    p.add_argument("--records", default=None, metavar="PARQUET",
                   help="skip generation: build the report from saved records (a parquet file or folder)")
    p.set_defaults(func=_eval)
    return p
