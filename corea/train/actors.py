"""The Ray actors of RLCC training. Each is thin: it holds a resource and delegates to library code.

- ``RolloutWorker``: a generation engine (vLLM on GPU, transformers on CPU); n samples per prompt.
- ``RewardActor``: grades whole groups and returns per-response rewards with every component.
- ``ReferenceActor``: frozen initial weights, per-token log-probabilities.
- ``PolicyActor``: one DeepSpeed rank of the policy.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Sequence

import ray

from corea.engines import SamplingParams, load_engine
from corea import grading
from corea.rewards import RewardWeights, batch_group_rewards
from corea.train.policy import Policy, ReferenceModel

log = logging.getLogger(__name__)


class RolloutWorker:
    """Generates groups: ``generate`` returns, per prompt, n samples as plain dicts."""

    def __init__(self, model_path: str, backend: str = "transformers", options: dict | None = None):
        self.engine = load_engine(model_path, backend=backend, **(options or {}))
        self.weights_version = 0

    def generate(self, prompts: Sequence[Any], params: SamplingParams) -> list[dict]:
        out = []
        for generation in self.engine.generate(list(prompts), params):
            out.append(
                {
                    "prompt_ids": list(generation.prompt_token_ids),
                    "samples": [
                        {
                            "text": s.text,
                            "token_ids": list(s.token_ids),
                            "logprobs": list(s.logprobs),
                            "finish_reason": s.finish_reason,
                        }
                        for s in generation.samples
                    ],
                    "weights_version": self.weights_version,
                }
            )
        return out

    def update_weights(self, state_dict: dict, version: int) -> int:
        self.engine.update_weights(state_dict)
        self.weights_version = version
        return version

    def init_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        self.engine.init_weight_group(master_address, master_port, rank_offset, world_size)

    def receive_weights(self, specs: list, version: int) -> int:
        self.engine.receive_weights(specs)
        self.weights_version = version
        return version

    def version(self) -> int:
        return self.weights_version

    def pid(self) -> int:
        return os.getpid()


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


class ReferenceActor(ReferenceModel):
    """Ray actor around the frozen reference model."""


class PolicyActor(Policy):
    """Ray actor around one DeepSpeed rank."""

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()


def free_port() -> int:
    """A TCP port free on this node now (for the DeepSpeed rendezvous)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote
def _rendezvous() -> tuple[str, int]:
    return ray.util.get_node_ip_address(), free_port()


def rendezvous_address(scheduling_strategy=None) -> tuple[str, int]:
    """Address and port for rank 0, chosen on the node where rank 0 will be placed."""
    task = _rendezvous.options(num_cpus=0, scheduling_strategy=scheduling_strategy) if scheduling_strategy else _rendezvous.options(num_cpus=0)
    return ray.get(task.remote())
