"""A miniature where steps matter: chained arithmetic written one operation per step, "((a + b) * c) - d".

Every question chains three operations on single digits (every intermediate value stays in 0..9); half of them
hold one multiplication. The answer is one step per operation, a blank line after each, then ``\\boxed{result} \\confidence{c}``:

    3 + 1 = 4\\n\\n4 * 2 = 8\\n\\n8 - 5 = 3\\n\\n\\boxed{3} \\confidence{1.0}

The tiny SLM is taught additions and subtractions exactly and multiplications poorly: in its fine-tuning data a
product is off by -2..2 (uniformly, so the right value is no likelier than four wrong ones), later steps
carrying the written value on. It therefore hesitates at exactly the multiplication steps (its token
probability there is low) and states a low confidence (0.2) on questions with a multiplication, 1.0 on others,
as an RLCC-calibrated SLM would. The tiny LLM is taught every step exactly. Both also learn COPE's formats
(``corea.collab.prompts``): a one-line plan, and an answer following a given plan. As in ``corea demo``, the
tiny models learn the task's questions (no tiny model generalizes arithmetic in minutes); the splits (train for
the stepwise policy, calibration for the mixture and thresholds, held-out eval) differ only in their role.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from corea.collab.prompts import execute_messages, plan_messages
from corea.data import Record

OPS = {"+": "add", "-": "subtract", "*": "multiply by"}
SLM_PRODUCT_NOISE = (-2, -1, 0, 1, 2)
SLM_LOW_CONFIDENCE = 0.2


@dataclass(frozen=True)
class Chain:
    start: int
    ops: tuple[tuple[str, int], ...]  # (op, operand) in order

    @property
    def question(self) -> str:
        expr = str(self.start)
        for i, (op, b) in enumerate(self.ops):
            expr = f"({expr} {op} {b})" if i < len(self.ops) - 1 else f"{expr} {op} {b}"
        return f"Compute {expr}."

    def values(self, product_noise=None) -> list[tuple[int, str, int, int]]:
        """(left, op, operand, written result) per step; ``product_noise()`` perturbs products (the SLM's data)."""
        out, value = [], self.start
        for op, b in self.ops:
            result = value + b if op == "+" else value - b if op == "-" else value * b
            if op == "*" and product_noise is not None:
                result = max(0, result + product_noise())
            out.append((value, op, b, result))
            value = result
        return out

    def answer(self, product_noise=None, confidence: float = 1.0) -> str:
        values = self.values(product_noise)
        steps = [f"{a} {op} {b} = {r}" for a, op, b, r in values]
        return "\n\n".join(steps) + f"\n\n\\boxed{{{values[-1][3]}}} \\confidence{{{confidence}}}"

    @property
    def plan(self) -> str:
        return "Plan: " + ", then ".join(f"{OPS[op]} {b}" for op, b in self.ops) + "."

    @property
    def has_product(self) -> bool:
        return any(op == "*" for op, _ in self.ops)

    @property
    def gold(self) -> int:
        return self.values()[-1][3]


def make_chain(rng: random.Random, with_product: bool) -> Chain:
    """Three operations keeping every value a single digit (0..9); with ``with_product`` one of them is a
    multiplication by 2..4, the others additions or subtractions."""
    while True:
        value, ops = rng.randint(1, 9), []
        start, where = value, (rng.randrange(3) if with_product else -1)
        for i in range(3):
            if i == where:
                if value > 4 or value < 1:
                    break
                op, b = "*", rng.randint(2, 9 // value) if 9 // value >= 2 else 0
                if b < 2:
                    break
            elif value < 9 and (value == 0 or rng.random() < 0.5):
                op, b = "+", rng.randint(1, 9 - value)
            else:
                op, b = "-", rng.randint(1, value)
            ops.append((op, b))
            value = value + b if op == "+" else value - b if op == "-" else value * b
        if len(ops) == 3:
            return Chain(start, tuple(ops))


def record(chain: Chain, split: str, i: int) -> Record:
    return Record(id=f"{split}-{i}", question=chain.question, gold=str(chain.gold), kind="math", dataset="chains",
                  meta={"split": split, "has_product": chain.has_product, "plan": chain.plan})


def build_splits(seed: int = 0, per_split: int = 30, sizes: dict[str, int] | None = None
                 ) -> dict[str, list[tuple[Chain, Record]]]:
    """Disjoint train / calibration / eval questions, half of each with one multiplication; ``sizes`` (split ->
    questions) overrides ``per_split`` for the splits it names."""
    rng, seen, out = random.Random(seed), set(), {}
    sizes = {k: per_split for k in ("train", "cal", "eval")} | dict(sizes or {})
    # (about 400 distinct product chains and 700 others exist; the splits together must stay well below that)
    for split in ("train", "cal", "eval"):
        items = []
        while len(items) < sizes[split]:
            chain = make_chain(rng, with_product=len(items) % 2 == 0)
            if chain.question not in seen:
                seen.add(chain.question)
                items.append((chain, record(chain, split, len(items))))
        out[split] = items
    return out


def sft_examples(chains: list[Chain], tier: str, repeats: int, seed: int = 0, cope_share: float = 1 / 3) -> list[dict]:
    """Fine-tuning pairs for ``tier``: the answer every pass; the plan and the answer to the plan-following
    prompt in a ``cope_share`` of the passes (they are easier to learn and only COPE uses them)."""
    rng = random.Random(seed)
    noise = (lambda: rng.choice(SLM_PRODUCT_NOISE)) if tier == "slm" else None
    out = []
    for _ in range(repeats):
        for c in chains:
            conf = SLM_LOW_CONFIDENCE if (tier == "slm" and c.has_product) else 1.0
            msgs = Record(id="", question=c.question, gold="", kind="math").messages()
            out.append({"prompt": msgs, "response": c.answer(noise, conf)})
            if rng.random() < cope_share:
                out.append({"prompt": plan_messages(msgs), "response": c.plan})
                out.append({"prompt": execute_messages(msgs, c.plan), "response": c.answer(noise, conf)})
    rng.shuffle(out)
    return out


def build_models(out: str | Path, splits, seed: int = 0, repeats: int = 50, retrain: bool = False,
                 llm_repeats: int | None = None) -> dict[str, Path]:
    """Tiny SLM and LLM checkpoints fine-tuned on the miniature (Ray Train + DeepSpeed); reused when present.
    ``llm_repeats`` (default ``repeats``): passes for the LLM, which learns the exact steps in fewer."""
    from corea.models import make_tiny_checkpoint
    from corea.train.sft import SFTConfig, sft

    out = Path(out).resolve()
    chains = [c for items in splits.values() for c, _ in items]
    paths = {}
    for tier in ("slm", "llm"):
        path = out / f"{tier}-chains"
        if retrain or not (path / "config.json").exists():
            base = make_tiny_checkpoint(out / f"base-{tier}", tier, seed=seed, overwrite=True)
            n = repeats if tier == "slm" or llm_repeats is None else llm_repeats
            sft(str(base), sft_examples(chains, tier, n, seed), path,
                SFTConfig(batch_size=32, lr=3e-3, seed=seed))
        paths[tier] = path
    return paths
