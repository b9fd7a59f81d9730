"""Weight sync orchestration, rollout placement and the vLLM engine's input checks (no vLLM needed).

The weight-transfer tests run real Ray actors and our real ``RolloutClient`` / ``NcclSync``; the policy ranks and
rollout workers are stand-ins for GPU-only actors (NCCL and vLLM need CUDA), each doing what vLLM's trainer
engine and worker do at the API we drive (tests/test_vllm_contract.py checks that API against vLLM itself).
"""

from __future__ import annotations

import sys
import time

import pytest

from corea.configfile import ConfigError
from corea.engines.base import EngineInputError
from corea.engines.vllm_engine import VLLMEngine, engine_args
from corea.train.config import load_config
from corea.train.placement import rollout_engine_options, training_bundles

P5EN_GPUS = 8


# ------------------------------------------------------------------------------------------- placement
@pytest.mark.parametrize("path, tp, workers", [("configs/paper-qwen2.5-7b-rlcc-l1.yaml", 1, 7),
                                               ("configs/paper-qwen2.5-32b-rlcc-l1.yaml", 4, 3)])
def test_paper_configs_place_their_rollout_engines(path, tp, workers):
    """Defect 2: one bundle of TP GPUs per rollout engine, and the mp backend for TP > 1 (vLLM's Ray executor
    refuses bundles of more than one GPU; left unset inside a placement group vLLM would choose it)."""
    cfg = load_config(path)
    bundles = training_bundles(cfg)
    options = rollout_engine_options(cfg)
    assert [b["GPU"] for b in bundles[:workers]] == [tp] * workers
    assert all(b.get("GPU", 0) <= P5EN_GPUS for b in bundles)  # every bundle fits one p5en node
    assert options.get("distributed_executor_backend") == ("mp" if tp > 1 else None)
    args = engine_args(cfg.model.policy, **options)
    assert args["tensor_parallel_size"] == tp and args["weight_transfer_config"] == {"backend": "nccl"}
    assert args.get("distributed_executor_backend") == ("mp" if tp > 1 else None)


def test_rollout_placement_errors_name_the_field():
    cfg = load_config("configs/paper-qwen2.5-32b-rlcc-l1.yaml", {"resources.rollout_gpus": "2"})
    with pytest.raises(ConfigError, match="resources.rollout_gpus"):
        rollout_engine_options(cfg)
    cfg = load_config("configs/paper-qwen2.5-32b-rlcc-l1.yaml")
    cfg.engine.options["distributed_executor_backend"] = "ray"
    with pytest.raises(ConfigError, match="'mp' backend"):
        rollout_engine_options(cfg)


# ------------------------------------------------------------------------------------------- engine input
def test_prompt_over_max_model_len_is_an_engine_input_error(tiny_checkpoints):
    """Defect 7: the vLLM tier knows max_model_len and rejects what vLLM would (prompt >= context)."""
    from corea.models.loading import load_tokenizer

    engine = object.__new__(VLLMEngine)
    engine.tokenizer, engine.max_model_len = load_tokenizer(tiny_checkpoints["slm"]), 12
    short = engine.encode("1 + 1")
    assert 0 < len(short) < 12
    with pytest.raises(EngineInputError, match="context holds 12"):
        engine.encode("one two three four five six seven eight nine ten eleven twelve thirteen")
    with pytest.raises(EngineInputError):
        engine.encode([{"role": "user"}])  # malformed messages: a client error too
    assert issubclass(EngineInputError, ValueError)


# ------------------------------------------------------------------------------------------- transfer
@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


class StandInRolloutWorker:
    """A vLLM rollout worker's weight API: joins a group, commits versions; "default" (0) after a restart."""

    def __init__(self, hang_s: float = 0.0):
        self.hang_s, self.weight_version, self.inits = hang_s, 0, []

    def init_weight_transfer(self, init_info):
        time.sleep(self.hang_s)
        self.inits.append(dict(init_info))

    def start_weight_update(self):
        pass

    def receive_weights(self, update_info):
        pass

    def finish_weight_update(self, version):
        self.weight_version = int(version)
        return self.weight_version

    def version(self):
        return self.weight_version

    def joined(self):
        return self.inits


class StandInPolicyRank:
    """What vLLM's NCCL trainer engine does at the client: rank 0 drives init / start / update / finish."""

    def __init__(self, rank: int):
        self.rank, self.inits, self.client = rank, [], None

    def init_weight_transfer(self, addr, port, world_size, client):
        self.inits.append((port, world_size))
        self.client = client
        if self.rank == 0:
            client.init_weight_transfer_engine({"master_address": addr, "master_port": port, "rank_offset": 1,
                                                "world_size": world_size})

    def send_weights(self, version):
        self.client.version = int(version)
        if self.rank == 0:
            self.client.start_weight_update()
            self.client.update_weights({"names": [], "dtype_names": [], "shapes": []})
            self.client.finish_weight_update()
        return version

    def joined(self):
        return self.inits


def test_client_waits_have_timeouts_that_name_what_they_waited_for(local_ray):
    from corea.train.weight_sync import RolloutClient

    worker = local_ray.remote(StandInRolloutWorker).options(num_cpus=0).remote(hang_s=30)
    client = RolloutClient([worker], tensor_parallel_size=1, timeout_s=1)
    with pytest.raises(TimeoutError, match="rollout workers 0..0: joining the weight-transfer group: no answer "
                                           "within 1 s"):
        client.init_weight_transfer_engine({"master_address": "127.0.0.1", "master_port": 1})
    local_ray.kill(worker)


def test_restarted_worker_rebuilds_the_group_for_every_rank(local_ray):
    """Defect 4: after a rollout worker restarts, every policy rank and every worker joins a new group (fresh
    port), each worker at its own rank offset, and the current weights are sent again."""
    from corea.train.actors import free_port
    from corea.train.weight_sync import NcclSync, actor_restarts

    ray = local_ray
    workers = [ray.remote(StandInRolloutWorker).options(num_cpus=0, max_restarts=1).remote() for _ in range(2)]
    policy = [ray.remote(StandInPolicyRank).options(num_cpus=0).remote(k) for k in range(2)]
    sync = NcclSync(policy, workers, tensor_parallel_size=2, rendezvous=lambda: ("127.0.0.1", free_port()))
    assert sync.sync(1) == 1
    ray.kill(workers[1], no_restart=False)  # comes back as a fresh worker at version 0, outside the group
    while actor_restarts([workers[1]]) == [0]:  # the kill has taken effect, as when the driver sees a call fail
        time.sleep(0.1)
    sync.resync(workers[1])
    assert ray.get([w.version.remote() for w in workers]) == [1, 1]
    ranks = ray.get([p.joined.remote() for p in policy])
    assert [len(r) for r in ranks] == [2, 2] and ranks[0] == ranks[1]  # all ranks, same groups
    assert ranks[0][0][0] != ranks[0][1][0] and {w for _, w in ranks[0]} == {1 + 2 * 2}
    first, restarted = ray.get([w.joined.remote() for w in workers])
    assert [i["rank_offset"] for i in first] == [1, 1] and [i["rank_offset"] for i in restarted] == [3]
    assert first[1]["master_port"] == restarted[0]["master_port"] == ranks[0][1][0]
    assert sync.sync(2) == 2 and ray.get([p.joined.remote() for p in policy])[0] == ranks[0]  # no rebuild
