"""A synthetic task with a learnable skill boundary, for the demo and the calibration benchmark.

"What is a + b?": *taught* sums have single-digit operands (a, b in 0..9); *untaught* sums have two-digit
operands (10..99). A tiny model warm-started on the taught sums (and a few untaught ones it cannot generalize
from) answers taught sums and fails untaught ones, while stating a high confidence everywhere: the
overconfident start of the paper. The disjoint splits are fixed by a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from corea.data import Record

#: Warm-start confidences and their probabilities: mostly 0.9 and 1.0 (overconfident), a thin tail below.
CONFIDENCES = [round(0.1 * k, 1) for k in range(11)]
CONFIDENCE_WEIGHTS = [0.25 / 9] * 9 + [0.15, 0.6]


def sum_record(a: int, b: int, tag: str) -> Record:
    return Record(id=f"{tag}-{a}-{b}", question=f"What is {a} + {b}?", gold=str(a + b), kind="math",
                  dataset="sums", meta={"taught": a < 10 and b < 10})


@dataclass
class SumsSplits:
    sft: list[Record]  # warm start: every taught sum + some untaught ones
    rl: list[Record]  # RL prompts: taught sums + unseen untaught sums
    eval: list[Record]  # held out from RL: other taught sums + other unseen untaught sums


def build_splits(seed: int = 0, rl_hard: int = 60) -> SumsSplits:
    """Disjoint splits; the RL set is balanced (60 taught, ``rl_hard`` unseen untaught sums): with many more
    hard prompts, their "lower your confidence" signal outweighs the easy prompts' "raise it" and the model
    lowers its confidence everywhere instead of learning where its skill ends."""
    rng = random.Random(seed)
    taught = [(a, b) for a in range(10) for b in range(10)]
    untaught = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(untaught)
    sft_hard, eval_hard, hard_rl = untaught[:100], untaught[100:180], untaught[180 : 180 + rl_hard]
    easy_rl = rng.sample(taught, 60)
    easy_eval = [p for p in taught if p not in easy_rl]
    sft = [sum_record(a, b, "sft") for a, b in taught + sft_hard]
    rl = [sum_record(a, b, "rl") for a, b in easy_rl + hard_rl]
    rng.shuffle(rl)
    evaluation = [sum_record(a, b, "eval") for a, b in easy_eval + eval_hard]
    return SumsSplits(sft=sft, rl=rl, eval=evaluation)


def answer_text(record: Record, confidence: float) -> str:
    return f"\\boxed{{{record.gold}}} \\confidence{{{confidence}}}"


def sft_examples(records: list[Record], seed: int, repeats: int) -> list[dict]:
    """Chat prompt -> answer with a confidence drawn from ``CONFIDENCE_WEIGHTS``, ``repeats`` passes, shuffled."""
    rng = random.Random(seed)
    out = [
        {"prompt": r.messages(), "response": answer_text(r, rng.choices(CONFIDENCES, CONFIDENCE_WEIGHTS)[0])}
        for _ in range(repeats)
        for r in records
    ]
    rng.shuffle(out)
    return out
