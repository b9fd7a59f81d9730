"""COREA: train, evaluate and serve a confidence-calibrated small-then-large language model cascade on Ray."""

__version__ = "0.1.0"
