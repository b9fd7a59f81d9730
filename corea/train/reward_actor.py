"""The reward actor, in a module of its own that imports no torch or transformers: its Ray worker process
imports only this (about 1 s), not the policy's stack (10-20 s of CPU on a busy 2-core machine)."""

from __future__ import annotations

import threading
from typing import Sequence

from corea import grading
from corea.rewards import RewardWeights, batch_group_rewards


class RewardActor:
    """Scores whole groups (responses, gold, kind, prompt) with ``corea.rewards``."""

    def __init__(self, confidence_reward: str = "l1", weights: dict | None = None, grading_timeout_s: float = 1.0,
                 grading_processes: int | None = None):
        """``grading_processes``: math-verify workers of this actor's grader (the pool sizes itself to
        ``os.cpu_count()`` when None; an actor gets its CPU share, ``resources.reward_cpus``, from the trainer).
        The workers start now, beside the other actors, not inside the first step that needs them."""
        self.confidence_reward = confidence_reward
        self.weights = RewardWeights(**(weights or {}))
        grader = grading.configure(timeout_s=grading_timeout_s, processes=grading_processes)  # training deadline
        threading.Thread(target=_warm, args=(grader,), name="corea-grader-warmup", daemon=True).start()

    def score(self, groups: Sequence[tuple[Sequence[str], str, str, str | None]]) -> list[list[dict]]:
        rewards = batch_group_rewards(
            [(responses, gold, kind) for responses, gold, kind, _ in groups],
            self.confidence_reward,
            self.weights,
            [prompt for *_, prompt in groups],
        )
        return [[r.as_dict() for r in group] for group in rewards]


def _warm(grader: grading.Grader) -> None:
    try:
        grader.warmup()
    except RuntimeError:  # closed (replaced) before its workers had started: nothing to warm
        pass
