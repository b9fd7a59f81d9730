"""The reward actor, in a module of its own that imports no torch or transformers: its Ray worker process
imports only this (about 1 s), not the policy's stack (10-20 s of CPU on a busy 2-core machine)."""

from __future__ import annotations

from typing import Sequence

from corea import grading
from corea.rewards import RewardWeights, batch_group_rewards


class RewardActor:
    """Scores whole groups (responses, gold, kind, prompt) with ``corea.rewards``."""

    def __init__(self, confidence_reward: str = "l1", weights: dict | None = None, grading_timeout_s: float = 1.0):
        self.confidence_reward = confidence_reward
        self.weights = RewardWeights(**(weights or {}))
        grading.configure(timeout_s=grading_timeout_s)  # this actor's grader: the training deadline

    def score(self, groups: Sequence[tuple[Sequence[str], str, str, str | None]]) -> list[list[dict]]:
        rewards = batch_group_rewards(
            [(responses, gold, kind) for responses, gold, kind, _ in groups],
            self.confidence_reward,
            self.weights,
            [prompt for *_, prompt in groups],
        )
        return [[r.as_dict() for r in group] for group in rewards]
