"""The weight-transfer group's rebuild after a rollout worker restarts does not queue behind generation.

Stand-ins as in tests/test_weight_sync.py (NCCL and vLLM need CUDA): single-threaded Ray actors whose
``generate`` sleeps, so any call made to a busy worker waits behind it, as on a vLLM rollout worker. The join
is given 3 s (vLLM's own rendezvous gives 300 s); generation takes longer, so a join issued while a worker
generates fails, and the rebuild passes only because it lets the generation in flight finish first.
"""

from __future__ import annotations

import inspect
import sys
import time

import pytest


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


class BusyWorker:
    """A rollout worker's weight API plus a ``generate`` that holds the (single-threaded) actor."""

    def __init__(self):
        self.weight_version, self.events = 0, []

    def generate(self, seconds: float):
        self.events.append(("generate", time.time()))
        time.sleep(seconds)
        self.events.append(("generated", time.time()))
        return self.weight_version

    def init_weight_transfer(self, init_info):
        self.events.append(("join", time.time()))

    def start_weight_update(self):
        pass

    def receive_weights(self, update_info):
        pass

    def finish_weight_update(self, version):
        self.weight_version = int(version)
        return self.weight_version

    def version(self):
        self.events.append(("version", time.time()))
        return self.weight_version

    def log(self):
        return self.events


class Rank:
    def __init__(self, rank: int):
        self.rank, self.client = rank, None

    def init_weight_transfer(self, addr, port, world_size, client):
        self.client = client
        if self.rank == 0:
            client.init_weight_transfer_engine({"master_address": addr, "master_port": port})

    def send_weights(self, version):
        self.client.version = int(version)
        if self.rank == 0:
            self.client.start_weight_update()
            self.client.update_weights({})
            self.client.finish_weight_update()
        return version


def test_rebuild_waits_for_generation_then_joins_within_vllms_limit(local_ray, monkeypatch):
    from corea.train import weight_sync
    from corea.train.actors import free_port

    ray = local_ray
    monkeypatch.setattr(weight_sync, "JOIN_TIMEOUT_S", 3.0)
    workers = [ray.remote(BusyWorker).options(num_cpus=0, max_restarts=1).remote() for _ in range(2)]
    policy = [ray.remote(Rank).options(num_cpus=0).remote(k) for k in range(2)]
    inflight: list = []

    def drain():  # what ClusterActors.drain does: wait on the driver's own refs, never call the workers
        ray.wait(inflight, num_returns=len(inflight), fetch_local=False)

    sync = weight_sync.NcclSync(policy, workers, 1, lambda: ("127.0.0.1", free_port()), drain=drain)
    assert sync.sync(1) == 1
    versions_before = sum(e == "version" for e, _ in ray.get(workers[0].log.remote()))

    # worker 0 is generating (8 s, longer than the join's 3 s) when worker 1 dies and restarts
    inflight.append(workers[0].generate.remote(8.0))
    time.sleep(0.5)
    ray.kill(workers[1], no_restart=False)
    while weight_sync.actor_restarts([workers[1]]) == [0]:
        time.sleep(0.1)
    sync.resync(workers[1])

    events = ray.get(workers[0].log.remote())
    generated = next(t for e, t in events if e == "generated")
    joins = [t for e, t in events if e == "join"]
    assert len(joins) == 2 and joins[1] >= generated  # the second join came after the generation, not behind it
    # the live worker was never asked for its version before the join (only after a send, as before)
    versions = [t for e, t in events if e == "version"][versions_before:]
    assert all(t > joins[1] for t in versions)
    assert ray.get([w.version.remote() for w in workers]) == [1, 1]

    # no restart since: the next sync sends without rebuilding, and asks no worker anything before the send
    assert sync.sync(2) == 2
    assert [e for e, _ in ray.get(workers[0].log.remote())].count("join") == 2


def test_without_draining_the_join_would_queue_behind_generation(local_ray, monkeypatch):
    """The failure the drain prevents: a join issued while a worker generates waits past the join's limit."""
    from corea.train import weight_sync

    ray = local_ray
    worker = ray.remote(BusyWorker).options(num_cpus=0).remote()
    busy = worker.generate.remote(8.0)
    client = weight_sync.RolloutClient([worker], 1, timeout_s=3)
    with pytest.raises(TimeoutError, match="joining the weight-transfer group: no answer within 3 s"):
        client.init_weight_transfer_engine({"master_address": "127.0.0.1", "master_port": 1})
    ray.get(busy)


def test_join_wait_is_below_vllms_rendezvous_timeout():
    from corea.train import weight_sync

    assert weight_sync.JOIN_TIMEOUT_S < weight_sync.VLLM_RENDEZVOUS_S
    utils = pytest.importorskip("vllm.distributed.utils", reason="vLLM not installed: the pinned value is checked "
                                "where it is (tests/test_vllm_contract.py's environment)")
    default = inspect.signature(utils.StatelessProcessGroup.create).parameters["store_timeout"].default
    assert default == weight_sync.VLLM_RENDEZVOUS_S
