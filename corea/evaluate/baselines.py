"""Baselines other than verbalized confidence: AvgProb and the Router (the Probe is in ``probe.py``).

- AvgProb: confidence = (1/T) sum_t exp(log p_t) over the response's T output tokens, from the saved log-probs
  (column ``mean_token_prob``, computed at generation time by ``Sample.mean_token_prob``).
- Router: the base model fine-tuned (``corea.train.sft``) to output, for a question alone, the probability that
  the SLM answers it correctly; its target is the RLVR-SLM's accuracy over ``samples`` (8) samples of each
  training question. Its output's first number in [0, 1] is p_router; its own tokens cost n_in + 4 n_out (ratio 1).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from corea.data import Record
from corea.protocol import CHOICE_LETTERS, parse_confidence

ROUTER_INSTRUCTION = (
    "Estimate and output the probability (0.0-1.0) that a small language model (10B) can answer the question "
    "correctly."
)
_FIRST_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def avgprob(frame: pd.DataFrame) -> pd.Series:
    """The AvgProb confidence of each record: its mean token probability."""
    return frame["mean_token_prob"].astype(float)


def router_question(record: Record) -> str:
    """The question text with its lettered options, without the COREA instruction."""
    text = record.question.strip()
    if record.choices:
        text += "\nAnswer Choices:\n" + "\n".join(f"({CHOICE_LETTERS[i]}) {c}" for i, c in enumerate(record.choices))
    return text


def router_prompt(record: Record) -> str:
    """``Question: {Question} Instruction: Estimate and output the probability (0.0-1.0) ...``"""
    return f"Question: {router_question(record)} Instruction: {ROUTER_INSTRUCTION}"


def router_messages(record: Record) -> list[dict[str, str]]:
    return [{"role": "user", "content": router_prompt(record)}]


def parse_router_prob(text: str) -> float | None:
    """The first number of the router's output when it lies in [0, 1]; None otherwise (the query defers)."""
    match = _FIRST_NUMBER.search(text or "")
    return parse_confidence(match.group(0)) if match else None


def format_probability(p: float) -> str:
    """The router's target text: p with 3 decimals (8 samples give multiples of 0.125 exactly)."""
    return f"{p:.3f}"


def router_targets(train_records: pd.DataFrame) -> pd.Series:
    """P(SLM correct) per (dataset, id): the mean correctness over that question's sampled runs."""
    return train_records.groupby(["dataset", "id"])["correct"].mean()


def router_examples(questions: Mapping[tuple[str, str], Record], targets: pd.Series) -> list[dict]:
    """SFT examples {"prompt": chat messages, "response": "0.625"} for every question with a target."""
    return [{"prompt": router_messages(questions[key]), "response": format_probability(float(p))}
            for key, p in targets.items() if key in questions]


def train_router(base_model: str, examples: Sequence[dict], out_dir: str | Path, sft_config=None) -> Path:
    """Fine-tune ``base_model`` on the router examples with Ray Train (``corea.train.sft.sft``)."""
    from corea.train.sft import sft

    return sft(base_model, list(examples), out_dir, sft_config)


def router_summary(targets: pd.Series) -> dict:
    """Distribution of the router's training targets (for the report)."""
    values = targets.to_numpy(float)
    return {"questions": int(values.size), "mean_target": float(np.mean(values)) if values.size else float("nan")}
