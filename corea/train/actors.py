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
from corea.models.loading import resolve_model_path
from corea.train.policy import Policy, ReferenceModel
from corea.train.reward_actor import RewardActor  # noqa: F401 (its own light module: see there)

log = logging.getLogger(__name__)


class RolloutWorker:
    """Generates groups: ``generate`` returns, per prompt, n samples as plain dicts."""

    def __init__(self, model_path: str, backend: str = "transformers", options: dict | None = None):
        # a URI or Hub id becomes a folder on this node (vLLM takes no s3:// model)
        self.engine = load_engine(resolve_model_path(model_path), backend=backend, **(options or {}))
        self.weights_version = 0  # transformers engines; vLLM keeps its own (``weight_version``)

    def generate(self, prompts: Sequence[Any], params: SamplingParams) -> list[dict]:
        version = self.version()
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
                    "weights_version": version,
                }
            )
        return out

    def update_weights(self, state_dict: dict, version: int) -> int:
        """Object-store sync (transformers engines)."""
        self.engine.update_weights(state_dict)
        self.weights_version = version
        return version

    # vLLM engines: the weight-transfer API and reload from a Hugging Face folder (corea.train.weight_sync)
    def init_weight_transfer(self, init_info: dict) -> None:
        self.engine.init_weight_transfer(init_info)

    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    def receive_weights(self, update_info: dict) -> None:
        self.engine.receive_weights(update_info)

    def finish_weight_update(self, version: int) -> int:
        self.engine.finish_weight_update(version)
        return self.version()

    def reload_weights(self, folder: str, version: int) -> int:
        self.engine.reload_weights(folder, version)
        return self.version()

    def version(self) -> int:
        if hasattr(self.engine, "weight_version"):
            from corea.engines.vllm_engine import version_number

            return version_number(self.engine.weight_version())
        return self.weights_version

    def pid(self) -> int:
        return os.getpid()


class ReferenceActor(ReferenceModel):
    """Ray actor around the frozen reference model."""


class PolicyActor(Policy):
    """Ray actor around one DeepSpeed rank, with the trainer side of the weight sync.

    Every rank takes part in every sync: ``named_full_params()`` gathers under ZeRO-3 (a collective), so all
    ranks iterate it in lockstep; only rank 0 sends."""

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def state_dict_for_sync(self) -> dict | None:
        """Object-store sync: the full state dict on rank 0, None on the others (every rank gathers)."""
        state = self.state_dict()
        return state if self.rank == 0 else None

    def init_weight_transfer(self, master_address: str, master_port: int, world_size: int, client) -> None:
        """vLLM's NCCL trainer engine on this rank (rank 0 opens the group with the rollout workers via
        ``client``; other ranks only join the gathers). Called on every rank together."""
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        from corea.train.weight_sync import full_param_source

        old = getattr(self, "_weight_transfer", None)
        if old is not None:
            old.shutdown()
        source = full_param_source(self.named_full_params)
        source.metadata()  # one lockstep pass on every rank, before rank 0 talks to the workers
        info = NCCLTrainerInitInfo(master_address=master_address, master_port=int(master_port),
                                   world_size=int(world_size), rank=self.rank)
        self._weight_transfer = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)

    def send_weights(self, version: int) -> int:
        """One transfer round: rank 0 drives start / update (concurrent with its broadcast) / finish with version
        ``version``; the other ranks exhaust the parameter generator."""
        transfer = getattr(self, "_weight_transfer", None)
        if transfer is None:
            raise RuntimeError("send_weights before init_weight_transfer")
        transfer.client.version = int(version)
        transfer.send_weights()
        log.info("rank %d: weights version %d sent", self.rank, version)
        return int(version)


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
