"""Evaluation: batch generation on Ray Data, metrics, cascade simulation, baselines, report and plots.

``evaluate(config) -> report folder`` runs everything; ``build_report(records, out_dir)`` only the part that
needs no generation (metrics, cascades, threshold selection, report.md, summary.json, plots). Names are
imported on first use, so ``corea.evaluate.cli`` stays light for the command line.
"""

import importlib

_EXPORTS = {
    "ConfigError": "corea.evaluate.config",
    "EvalConfig": "corea.evaluate.config",
    "load_eval_config": "corea.evaluate.config",
    "build_report": "corea.evaluate.report",
    "compute_report": "corea.evaluate.report",
    "evaluate": "corea.evaluate.run",
    "run_eval": "corea.evaluate.run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'corea.evaluate' has no attribute {name!r}")
