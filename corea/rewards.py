"""RLCC rewards: correctness, format, group accuracy and the confidence term.

For a response with confidence c, correctness y in {0, 1}, in a group of G responses with group accuracy
p = (1/G) sum_i y_i:

    r = w_acc * y + w_fmt * r_fmt + w_conf * r_conf

y is ``corea.grading``'s verdict on the whole response (math-verify's extraction; no box needed); r_fmt checks
the last ``\\boxed{}`` of ``corea.protocol``, the answer the cascade shows.

A response without a valid confidence gets r_conf = -1 (the lowest), except under ``none`` (RLVR) where
r_conf = 0 for every response.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from corea import grading
from corea.protocol import ParsedResponse, language_consistent, parse_response

#: Clip factor for the KL forms: c is clipped to [KL_EPS, 1 - KL_EPS] and the result divided by |ln KL_EPS|.
KL_EPS = 1e-3
#: Format reward weights: r_fmt = [language consistent] * (FMT_ANSWER * [answer] + FMT_CONFIDENCE * [confidence]).
FMT_ANSWER = 0.5
FMT_CONFIDENCE = 0.5


def l1_reward(c: float, target: float) -> float:
    """-|c - target|, in [-1, 0]."""
    return -abs(c - target)


def l2_reward(c: float, target: float) -> float:
    """-(c - target)^2, in [-1, 0]."""
    return -((c - target) ** 2)


def kl_reward(c: float, target: float, eps: float = KL_EPS) -> float:
    """Cross-entropy form of -KL(Bernoulli(target) || Bernoulli(c)) without the entropy of target:

        r = [target * ln(c') + (1 - target) * ln(1 - c')] / |ln(eps)|,   c' = clip(c, eps, 1 - eps)

    In [-1, 0]; maximal at c = target (where it equals -H(target) / |ln eps|).
    """
    c = min(max(c, eps), 1.0 - eps)
    return (target * math.log(c) + (1.0 - target) * math.log(1.0 - c)) / abs(math.log(eps))


# name -> (pointwise reward, whether the target is the group accuracy p (True) or the sample's own y)
CONFIDENCE_REWARDS: dict[str, tuple[Callable[[float, float], float] | None, bool]] = {
    "l1": (l1_reward, True),
    "l2": (l2_reward, True),
    "kl": (kl_reward, True),
    "sample_l1": (l1_reward, False),
    "brier": (l2_reward, False),
    "sample_l2": (l2_reward, False),
    "sample_kl": (kl_reward, False),
    "none": (None, False),
}
MISSING_CONFIDENCE_REWARD = -1.0


def confidence_reward(kind: str, confidence: float | None, correct: bool, group_accuracy: float) -> float:
    """The confidence term of one response under reward ``kind`` (see ``CONFIDENCE_REWARDS``)."""
    if kind not in CONFIDENCE_REWARDS:
        raise ValueError(f"unknown confidence reward {kind!r}; choose from {sorted(CONFIDENCE_REWARDS)}")
    fn, uses_group = CONFIDENCE_REWARDS[kind]
    if fn is None:
        return 0.0
    if confidence is None:
        return MISSING_CONFIDENCE_REWARD
    return fn(confidence, group_accuracy if uses_group else float(correct))


def group_accuracy(correct: Sequence[bool]) -> float:
    """p = (1/G) * sum_i y_i."""
    if not correct:
        raise ValueError("a group needs at least one response")
    return sum(bool(y) for y in correct) / len(correct)


def format_reward(parsed: ParsedResponse, response: str | bytes, prompt: str | None = None) -> float:
    """r_fmt = [language consistent] * (0.5 * [answer present] + 0.5 * [valid confidence]), in [0, 1]."""
    if not language_consistent(response, prompt):
        return 0.0
    return FMT_ANSWER * parsed.has_answer + FMT_CONFIDENCE * parsed.has_confidence


class RewardWeights(BaseModel):
    """Weights of the three terms of the total reward."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    accuracy: float = Field(1.0, ge=0)
    format: float = Field(1.0, ge=0)
    confidence: float = Field(1.0, ge=0)


@dataclass(frozen=True)
class RewardBreakdown:
    """The total reward of one response and every component, for training and logging."""

    total: float
    correctness: float  # r_acc = y
    format: float  # r_fmt
    confidence_reward: float  # r_conf
    group_accuracy: float  # p
    confidence: float | None  # the parsed confidence c
    answer: str | None

    @property
    def correct(self) -> bool:
        return self.correctness > 0.5

    def as_dict(self) -> dict:
        return asdict(self)


def _combine(
    parsed: Sequence[ParsedResponse],
    responses: Sequence[str | bytes],
    verdicts: Sequence[bool],
    confidence_reward_kind: str,
    weights: RewardWeights,
    prompt: str | None,
) -> list[RewardBreakdown]:
    p = group_accuracy(verdicts)
    out = []
    for parse, text, y in zip(parsed, responses, verdicts):
        r_fmt = format_reward(parse, text, prompt)
        r_conf = confidence_reward(confidence_reward_kind, parse.confidence, y, p)
        total = weights.accuracy * float(y) + weights.format * r_fmt + weights.confidence * r_conf
        out.append(RewardBreakdown(total, float(y), r_fmt, r_conf, p, parse.confidence, parse.answer))
    return out


def group_rewards(
    responses: Sequence[str | bytes],
    gold: str,
    kind: str = "math",
    confidence_reward: str = "l1",
    weights: RewardWeights | None = None,
    prompt: str | None = None,
) -> list[RewardBreakdown]:
    """Rewards of the G responses to one prompt; the group accuracy p is shared by all of them."""
    return batch_group_rewards([(responses, gold, kind)], confidence_reward, weights, [prompt])[0]


def batch_group_rewards(
    groups: Sequence[tuple[Sequence[str | bytes], str, str]],
    confidence_reward: str = "l1",
    weights: RewardWeights | None = None,
    prompts: Sequence[str | None] | None = None,
) -> list[list[RewardBreakdown]]:
    """``group_rewards`` for many groups (responses, gold, kind) at once, graded in parallel."""
    if confidence_reward not in CONFIDENCE_REWARDS:
        raise ValueError(f"unknown confidence reward {confidence_reward!r}; choose from {sorted(CONFIDENCE_REWARDS)}")
    weights = weights or RewardWeights()
    prompts = list(prompts) if prompts is not None else [None] * len(groups)
    if len(prompts) != len(groups):
        raise ValueError(f"{len(prompts)} prompts for {len(groups)} groups")
    parsed = [[parse_response(r) for r in responses] for responses, _, _ in groups]
    verdicts = grading.grade_groups([(responses, gold, kind) for responses, gold, kind in groups])
    return [
        _combine(group_parsed, responses, group_verdicts, confidence_reward, weights, prompt)
        for group_parsed, (responses, _, _), group_verdicts, prompt in zip(parsed, groups, verdicts, prompts)
    ]
