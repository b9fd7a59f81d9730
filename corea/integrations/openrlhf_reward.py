"""A reward function file for OpenRLHF 0.11.2 (``--reward.remote_url /path/to/openrlhf_reward.py
--data.label_key answer``; releases before 0.11 spell them ``--remote_rm_url`` and ``--label_key``).

OpenRLHF calls ``reward_func(queries, prompts, labels)`` with one rollout per element, where a query is the
prompt followed by the response. It scores rollouts one at a time, so it cannot see a whole group of
responses to the same prompt, and the group-level rewards (``l1``, ``l2``, ``kl``, which compare a confidence
with the group accuracy p) need the group reward server (``corea reward-server``,
``corea.integrations.group_reward_server``) or this project's RewardActor. The sample-level rewards compare the
confidence with the response's own correctness y and work here:

    COREA_CONFIDENCE_REWARD = brier (default) | sample_l1 | sample_kl

A label that is a single letter A-J is graded as multiple choice, anything else as maths.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import torch

from corea.rewards import RewardWeights, batch_group_rewards

SAMPLE_LEVEL = ("brier", "sample_l1", "sample_kl")
_LETTER = re.compile(r"^\s*\(?([A-J])\)?\s*$")


def _reward_kind() -> str:
    kind = os.environ.get("COREA_CONFIDENCE_REWARD", "brier")
    if kind not in SAMPLE_LEVEL:
        raise ValueError(
            f"COREA_CONFIDENCE_REWARD={kind!r}: OpenRLHF scores one rollout at a time, so only the sample-level "
            f"rewards {SAMPLE_LEVEL} apply; group-level rewards need `corea reward-server` or corea's RewardActor"
        )
    return kind


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[str]) -> dict:
    """Total RLCC reward per rollout, with the components as ``extra_logs`` (OpenRLHF's dict form)."""
    if not (len(queries) == len(prompts) == len(labels)):
        raise ValueError(f"{len(queries)} queries, {len(prompts)} prompts and {len(labels)} labels")
    responses = [q[len(p):] if q.startswith(p) else q for q, p in zip(queries, prompts)]
    groups = [([r], str(label), "choice" if _LETTER.match(str(label)) else "math") for r, label in zip(responses, labels)]
    scored = [g[0] for g in batch_group_rewards(groups, _reward_kind(), RewardWeights(), list(prompts))]
    rewards = torch.tensor([s.total for s in scored], dtype=torch.float32)
    return {
        "rewards": rewards,
        "scores": rewards,
        "extra_logs": {
            "correctness": torch.tensor([s.correctness for s in scored]),
            "format": torch.tensor([s.format for s in scored]),
            "confidence_reward": torch.tensor([s.confidence_reward for s in scored]),
        },
    }
