"""``corea eval``: evaluation, cascade simulation and report; also ``ray_jobs/evaluate.py``."""

from __future__ import annotations

import argparse
import sys


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


def main_eval(argv: list[str] | None = None) -> int:
    """``corea eval`` as a standalone command line (used by ray_jobs/evaluate.py)."""
    import logging

    parser = argparse.ArgumentParser(prog="corea")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"corea eval: error: {exc}", file=sys.stderr)
        return 2
