"""Moving the policy's weights to the rollout workers after each update: one strategy object per transport.

- ``ObjectStoreSync`` (transformers rollout workers, CPU): every policy rank builds the full state dict (a
  collective under ZeRO-3); rank 0's copy goes through the object store to every worker and is kept to resync a
  restarted one.
- ``NcclSync`` (vLLM rollout workers, GPU trainers): vLLM's weight-transfer API. Every policy rank runs vLLM's
  ``NCCLTrainerWeightTransferEngine`` over ``Policy.named_full_params()`` (all ranks gather in lockstep, rank 0
  broadcasts); the workers receive with vLLM's ``NCCLWeightTransferEngine``. No CPU copy of the weights is made.
  After a worker restart the transfer group is rebuilt for every rank (fresh port) and the weights sent again.
  The rebuild never calls a live worker before the join: a call queues behind a running ``generate`` on the
  single-threaded actor, while vLLM's rendezvous (``StatelessProcessGroup.create``, a TCPStore) waits only 300 s
  for every rank. So the driver first lets the generation in flight finish (``drain``), waits until the
  restarted worker is ALIVE in Ray's actor table, and tells restarts apart by the table's restart count
  recorded when the group was built (not by asking the workers for their version); every wait inside the
  rendezvous is shorter than vLLM's (``JOIN_TIMEOUT_S``).
- ``FolderSync`` (vLLM rollout workers, trainers without GPUs): every policy rank calls ``Policy.export_hf`` into
  ``OUT/weights/v{version}`` (rank 0 writes) and each worker runs vLLM's ``reload_weights`` on that folder; a
  restarted worker reloads the same folder. The folder must be on storage the rollout nodes can read.

Every blocking wait has a timeout and an error naming what it waited for. Weight versions are vLLM's
``weight_version`` (the step number as a string) and are logged.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

log = logging.getLogger(__name__)
SYNC_TIMEOUT_S = 1800.0  # one full transfer of a 32B model, with margin
RESTART_TIMEOUT_S = 1800.0  # a rollout worker coming back (a cold vLLM start-up; resources.worker_restart_timeout_s)
VLLM_RENDEZVOUS_S = 300  # vllm 0.29 StatelessProcessGroup.create(store_timeout=300): every rank must join by then
JOIN_TIMEOUT_S = 240.0  # our wait for the workers' join, inside vLLM's rendezvous: below VLLM_RENDEZVOUS_S
DRAIN_TIMEOUT_S = 3600.0  # the generation in flight finishing before a rebuild (one step's rollout, with margin)


def wait(refs: Sequence[Any], what: str, timeout_s: float) -> list[Any]:
    """``ray.get(refs)`` within ``timeout_s``; on timeout a ``TimeoutError`` saying what did not finish."""
    try:
        return ray.get(list(refs), timeout=timeout_s)
    except GetTimeoutError as exc:
        raise TimeoutError(f"{what}: no answer within {timeout_s:.0f} s") from exc


def wait_alive(call, what: str, timeout_s: float = RESTART_TIMEOUT_S) -> Any:
    """``ray.get(call())``, made again while the actor restarts (``max_restarts``), within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            return ray.get(call(), timeout=max(1.0, left))
        except (RayActorError, ActorUnavailableError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: the actor did not come back within {timeout_s:.0f} s") from exc
            time.sleep(1.0)
        except GetTimeoutError as exc:
            raise TimeoutError(f"{what}: no answer within {timeout_s:.0f} s") from exc


def worker_rank_offsets(workers: int, tensor_parallel_size: int) -> tuple[list[int], int]:
    """NCCL rank of the first worker of each rollout engine, and the group size: trainer rank 0, then each
    engine's ``tensor_parallel_size`` workers in turn (vLLM adds the worker's TP rank to ``rank_offset``)."""
    return [1 + i * tensor_parallel_size for i in range(workers)], 1 + workers * tensor_parallel_size


class RolloutClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over our rollout-worker actors (runs on policy rank 0).

    vLLM's built-in trainer engine gives every worker ``rank_offset=1``, which fits one vLLM deployment; we run
    several independent engines, so each engine gets its own offset here. Every call waits at most ``timeout_s``.
    ``version`` is the weight version that ``finish_weight_update`` commits when the trainer engine passes none.
    """

    def __init__(self, workers: Sequence[Any], tensor_parallel_size: int, timeout_s: float = SYNC_TIMEOUT_S,
                 restarted: Sequence[int] = ()):
        self.workers = list(workers)
        self.offsets, self.world_size = worker_rank_offsets(len(self.workers), tensor_parallel_size)
        self.timeout_s = timeout_s
        self.restarted = list(restarted)  # indices of workers that restarted since the last group (idle)
        self.version: int | None = None

    def _all(self, what: str, calls: list) -> list:
        return wait(calls, f"rollout workers 0..{len(self.workers) - 1}: {what}", self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """Every worker joins at once; the driver made sure they are alive and idle (``NcclSync._connect``), so
        no other call precedes the join, and the wait ends before vLLM's own rendezvous timeout. Only a restarted
        (idle) worker is called first: this process's view of it can lag the driver's."""
        for i in self.restarted:
            wait_alive(self.workers[i].version.remote, f"restarted rollout worker {i} before the join",
                       min(self.timeout_s, JOIN_TIMEOUT_S / 2))
        calls = [w.init_weight_transfer.remote({**init_info, "rank_offset": off, "world_size": self.world_size})
                 for w, off in zip(self.workers, self.offsets)]
        wait(calls, f"rollout workers 0..{len(self.workers) - 1}: joining the weight-transfer group",
             min(self.timeout_s, JOIN_TIMEOUT_S))

    def start_weight_update(self) -> None:
        self._all("start_weight_update", [w.start_weight_update.remote() for w in self.workers])

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all("receiving the broadcast weights", [w.receive_weights.remote(update_info) for w in self.workers])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = int(weight_version) if weight_version is not None else self.version
        self._all(f"finish_weight_update (version {version})",
                  [w.finish_weight_update.remote(version) for w in self.workers])


def full_param_source(named_full_params):
    """A vLLM ``WeightSource`` over ``named_full_params()`` (a generator every rank iterates in lockstep).

    ``metadata()`` (names, dtypes, full shapes) is read once from one pass over the generator, so it agrees with
    iteration by construction; every rank makes that pass together, at set-up."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class FullParamSource(WeightSource):
        def __init__(self):
            self._meta: list[ParamMeta] | None = None

        def metadata(self) -> list[ParamMeta]:
            if self._meta is None:
                self._meta = [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in named_full_params()]
            return self._meta

        def __iter__(self):
            return iter(named_full_params())

    return FullParamSource()


class ObjectStoreSync:
    """State dict through the object store (transformers rollout workers)."""

    def __init__(self, policy: Sequence[Any], rollout: Sequence[Any]):
        self.policy, self.rollout = list(policy), list(rollout)
        self.current: tuple[Any, int] | None = None  # (object ref of rank 0's state dict, version)

    def sync(self, version: int) -> int:
        refs = [p.state_dict_for_sync.remote() for p in self.policy]  # every rank: ZeRO-3 gathers are collectives
        wait(refs[1:], "policy ranks 1.. gathering the weights", SYNC_TIMEOUT_S)
        self.current = (refs[0], version)
        versions = [wait_alive(lambda w=w: w.update_weights.remote(refs[0], version),
                               f"rollout worker {i} loading weights version {version}", SYNC_TIMEOUT_S)
                    for i, w in enumerate(self.rollout)]
        return _checked(versions, version)

    def resync(self, worker: Any) -> None:
        if self.current is not None:
            ref, version = self.current
            wait_alive(lambda: worker.update_weights.remote(ref, version),
                       f"restarted rollout worker loading version {version}", SYNC_TIMEOUT_S)


class FolderSync:
    """vLLM workers reload a Hugging Face folder exported by the policy (no GPU trainers)."""

    def __init__(self, policy: Sequence[Any], rollout: Sequence[Any], folder: str | Path):
        self.policy, self.rollout = list(policy), list(rollout)
        self.root = Path(folder)
        self.current: tuple[Path, int] | None = None

    def sync(self, version: int) -> int:
        folder = self.root / f"v{version}"
        wait([p.export_hf.remote(str(folder)) for p in self.policy], f"policy ranks exporting {folder}",
             SYNC_TIMEOUT_S)
        versions = [wait_alive(lambda w=w: w.reload_weights.remote(str(folder), version),
                               f"rollout worker {i} reloading {folder}", SYNC_TIMEOUT_S)
                    for i, w in enumerate(self.rollout)]
        previous, self.current = self.current, (folder, version)
        if previous is not None and previous[0] != folder:
            shutil.rmtree(previous[0], ignore_errors=True)
        return _checked(versions, version)

    def resync(self, worker: Any) -> None:
        if self.current is not None:
            folder, version = self.current
            wait_alive(lambda: worker.reload_weights.remote(str(folder), version),
                       f"restarted rollout worker reloading {folder}", SYNC_TIMEOUT_S)


class NcclSync:
    """vLLM's NCCL weight transfer from every policy rank (rank 0 sends) to every rollout worker.

    ``drain()`` (from ``ClusterActors``) returns once no ``generate`` is in flight on any rollout worker."""

    def __init__(self, policy: Sequence[Any], rollout: Sequence[Any], tensor_parallel_size: int, rendezvous,
                 restart_timeout_s: float = RESTART_TIMEOUT_S, drain=None):
        self.policy, self.rollout = list(policy), list(rollout)
        self.tp = int(tensor_parallel_size)
        self.rendezvous = rendezvous  # () -> (address, free port) on policy rank 0's node
        self.restart_timeout_s = restart_timeout_s
        self.drain = drain or (lambda: None)
        self.version: int | None = None
        self.ready = False
        self.restarts: list[int] | None = None  # each worker's restart count when the group was built
        self.restarted: set[int] = set()  # workers known to have restarted since (resync)

    def _connect(self) -> None:
        """(Re)build the transfer group: every policy rank and every rollout worker, on a fresh port, once no
        generation is in flight and every worker is alive (so each takes the join at once)."""
        self.drain()
        wait_actors_alive(self.rollout, "rollout workers before joining the weight-transfer group",
                          self.restart_timeout_s)
        restarts = actor_restarts(self.rollout)
        restarted = self.restarted | {i for i, (now, then) in enumerate(zip(restarts, self.restarts or restarts))
                                      if now != then}
        self.restarts, self.restarted = restarts, set()
        addr, port = self.rendezvous()
        client = RolloutClient(self.rollout, self.tp, restarted=sorted(restarted))
        log.info("weight-transfer group: %s:%d, %d ranks", addr, port, client.world_size)
        wait([p.init_weight_transfer.remote(addr, port, client.world_size, client) for p in self.policy],
             f"policy ranks and rollout workers building the weight-transfer group at {addr}:{port}",
             SYNC_TIMEOUT_S)
        self.ready = True

    def sync(self, version: int) -> int:
        if self.ready and actor_restarts(self.rollout) != self.restarts:  # Ray's actor table: no call queues
            log.warning("a rollout worker restarted since version %s: rebuilding the transfer group", self.version)
            self.ready = False
        if not self.ready:
            self._connect()
        wait([p.send_weights.remote(version) for p in self.policy],
             f"policy ranks sending weights version {version} to {len(self.rollout)} rollout workers",
             SYNC_TIMEOUT_S)
        self.version = version
        versions = wait([w.version.remote() for w in self.rollout], "rollout workers reporting their version", 60)
        return _checked(versions, version)

    def resync(self, worker: Any) -> None:
        """A restarted worker left the group: rebuild it for all ranks, then send the current weights again
        (the policy's weights are those of the last sync while rollouts run)."""
        wait_alive(worker.version.remote, "restarted rollout worker", self.restart_timeout_s)  # idle: answers
        self.restarted |= {i for i, w in enumerate(self.rollout) if w._actor_id == worker._actor_id}
        self.ready = False
        if self.version is not None:
            self.sync(self.version)


def actor_restarts(actors: Sequence[Any]) -> list[int]:
    """How often each actor has restarted, from Ray's actor table in the GCS (the actor is not called)."""
    from ray._private.state import actors as actor_table

    return [int(actor_table(a._actor_id.hex()).get("NumRestarts", 0)) for a in actors]


def wait_actors_alive(actors: Sequence[Any], what: str, timeout_s: float) -> None:
    """Until every actor is ALIVE in Ray's actor table (its constructor has returned), within ``timeout_s``."""
    from ray._private.state import actors as actor_table

    deadline = time.monotonic() + timeout_s
    while True:
        states = [actor_table(a._actor_id.hex()).get("State") for a in actors]
        if all(s == "ALIVE" for s in states):
            return
        if "DEAD" in states or time.monotonic() > deadline:
            raise TimeoutError(f"{what}: actor states {states} (not all ALIVE within {timeout_s:.0f} s)")
        time.sleep(1.0)


def _checked(versions: Sequence[int], version: int) -> int:
    if set(versions) != {version}:
        raise RuntimeError(f"rollout workers report weight versions {list(versions)}, expected {version}")
    log.debug("weights version %d on %d rollout workers", version, len(versions))
    return version


def make_weight_sync(backend: str, trainer_gpus: float, policy, rollout, tensor_parallel_size: int,
                     rendezvous, folder: str | Path, restart_timeout_s: float = RESTART_TIMEOUT_S, drain=None):
    """The strategy for this run: object store (transformers), NCCL (vLLM + GPU trainers), else folder."""
    if backend != "vllm":
        return ObjectStoreSync(policy, rollout)
    if trainer_gpus > 0:
        return NcclSync(policy, rollout, tensor_parallel_size, rendezvous, restart_timeout_s, drain)
    return FolderSync(policy, rollout, folder)
