"""A synthetic task with a learnable skill boundary, for the demo and the calibration benchmark.

"What is a + b?": *taught* sums have single-digit operands (a, b in 0..9); *untaught* sums have two-digit
operands (10..99). A tiny model warm-started on the taught sums (and a few untaught ones it cannot generalize
from) answers taught sums and fails untaught ones, while stating a high confidence everywhere: the
overconfident start of the paper. The disjoint splits are fixed by a seed.

Out of domain (never seen in RL, taught in the warm start with the same skill boundary):
- OOD math: "What is a - b?" (a >= b), taught for single-digit operands, untaught for two-digit ones;
- OOD non-math: "Which of these is a + b?" with four lettered options, graded by the chosen letter.
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


def difference_record(a: int, b: int, tag: str) -> Record:
    return Record(id=f"{tag}-{a}-{b}", question=f"What is {a} - {b}?", gold=str(a - b), kind="math",
                  dataset="differences", meta={"taught": a < 10 and b < 10})


def choice_record(a: int, b: int, tag: str) -> Record:
    """"Which of these is a + b?" with the sum and three near misses (+-1, +-10) in a seeded order."""
    rng = random.Random(f"{tag}-{a}-{b}")
    total = a + b
    misses = [x for x in (total + 1, total - 1, total + 10, total - 10, total + 2) if x >= 0 and x != total]
    options = [total] + rng.sample(misses, 3)
    rng.shuffle(options)
    letter = "ABCD"[options.index(total)]
    return Record(id=f"{tag}-{a}-{b}", question=f"Which of these is {a} + {b}?", gold=letter, kind="choice",
                  choices=tuple(str(o) for o in options), dataset="sum-choice", meta={"taught": a < 10 and b < 10})


#: Taught sums among the RL questions; the other 40 are held out for evaluation.
RL_TAUGHT = 60


@dataclass
class SumsSplits:
    sft: list[Record]  # warm start: every taught sum + some untaught ones
    rl: list[Record]  # RL questions: RL_TAUGHT taught sums + unseen untaught sums, each once
    eval: list[Record]  # held out from RL: other taught sums + other unseen untaught sums

    def rl_prompts(self) -> list[Record]:
        """The RL prompt list: every untaught question once, each taught one round(untaught / taught) times, so
        that an RL step draws taught and untaught prompts about equally often (with many more untaught draws,
        their "lower your confidence" signal outweighs the taught prompts' "raise it" and the model lowers its
        confidence everywhere instead of learning where its skill ends)."""
        taught = sum(r.meta["taught"] for r in self.rl)
        repeats = max(1, round((len(self.rl) - taught) / max(taught, 1)))
        return [r for r in self.rl for _ in range(repeats if r.meta["taught"] else 1)]


def build_splits(seed: int = 0, rl_hard: int = 180) -> SumsSplits:
    """Disjoint splits; the RL questions are ``RL_TAUGHT`` taught sums and ``rl_hard`` unseen untaught ones.

    Many distinct untaught questions, each drawn a few times in RL: with 60 drawn 11 times each, the correctness
    reward taught the SLM the answers of the two whose sum is 95, and it then answered "95" at confidence 1.0 on
    unseen untaught sums (10 of the 12 untaught in-domain answers, of 160, that the cascade kept wrong); with 180
    it states one low confidence on every untaught sum."""
    rng = random.Random(seed)
    taught = [(a, b) for a in range(10) for b in range(10)]
    untaught = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(untaught)
    sft_hard, eval_hard, hard_rl = untaught[:100], untaught[100:180], untaught[180 : 180 + rl_hard]
    easy_rl = rng.sample(taught, RL_TAUGHT)
    easy_eval = [p for p in taught if p not in easy_rl]
    sft = [sum_record(a, b, "sft") for a, b in taught + sft_hard]
    rl = [sum_record(a, b, "rl") for a, b in easy_rl + hard_rl]
    rng.shuffle(rl)
    evaluation = [sum_record(a, b, "eval") for a, b in easy_eval + eval_hard]
    return SumsSplits(sft=sft, rl=rl, eval=evaluation)


@dataclass
class OODSplits:
    sft: list[Record]  # added to the warm start: every taught item of both tasks + a few untaught ones
    math: list[Record]  # OOD math evaluation: held-out taught and unseen untaught differences
    choice: list[Record]  # OOD non-math evaluation: held-out taught and unseen untaught choice questions


def build_ood_splits(seed: int = 0, n_eval_taught: int = 30, n_eval_untaught: int = 40,
                     n_sft_untaught: int = 40) -> OODSplits:
    """Disjoint out-of-domain splits: the warm start sees every taught item and ``n_sft_untaught`` untaught
    ones of each task; evaluation takes ``n_eval_taught`` taught items and ``n_eval_untaught`` unseen ones."""
    rng = random.Random(seed + 7919)
    out: dict[str, tuple[list[Record], list[Record]]] = {}
    for task, make, pairs in (
        ("diff", difference_record, [(a, b) for a in range(10) for b in range(a + 1)]),
        ("choice", choice_record, [(a, b) for a in range(10) for b in range(10)]),
    ):
        hard = [(a, b) for a in range(10, 100) for b in range(10, 100) if task != "diff" or a >= b]
        rng.shuffle(hard)
        sft_hard, eval_hard = hard[:n_sft_untaught], hard[n_sft_untaught : n_sft_untaught + n_eval_untaught]
        sft = [make(a, b, f"sft-{task}") for a, b in pairs + sft_hard]
        evaluation = [make(a, b, f"eval-{task}") for a, b in rng.sample(pairs, n_eval_taught) + eval_hard]
        out[task] = (sft, evaluation)
    return OODSplits(sft=out["diff"][0] + out["choice"][0], math=out["diff"][1], choice=out["choice"][1])


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
