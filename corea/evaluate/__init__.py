"""Evaluation: batch generation on Ray Data, metrics, cascade simulation, baselines, report and plots.

``evaluate(config) -> report folder`` runs everything; ``build_report(records, out_dir)`` only the part that
needs no generation (metrics, cascades, threshold selection, report.md, summary.json, plots).
"""

from corea.evaluate.config import ConfigError, EvalConfig, load_eval_config
from corea.evaluate.report import build_report, compute_report
from corea.evaluate.run import evaluate, run_eval

__all__ = ["ConfigError", "EvalConfig", "build_report", "compute_report", "evaluate", "load_eval_config", "run_eval"]
