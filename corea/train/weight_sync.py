"""Moving the policy's weights to the rollout workers after each update: one strategy object per transport.

- ``ObjectStoreSync`` (transformers rollout workers, CPU): every policy rank builds the full state dict (a
  collective under ZeRO-3); rank 0's copy goes through the object store to every worker and is kept to resync a
  restarted one.
- ``NcclSync`` (vLLM rollout workers, GPU trainers): vLLM's weight-transfer API. Every policy rank runs vLLM's
  ``NCCLTrainerWeightTransferEngine`` over ``Policy.named_full_params()`` (all ranks gather in lockstep, rank 0
  broadcasts); the workers receive with vLLM's ``NCCLWeightTransferEngine``. No CPU copy of the weights is made.
  After a worker restart the transfer group is rebuilt for every rank (fresh port) and the weights sent again.
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
RESTART_TIMEOUT_S = 900.0  # a rollout worker coming back (vLLM start-up)


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

    def __init__(self, workers: Sequence[Any], tensor_parallel_size: int, timeout_s: float = SYNC_TIMEOUT_S):
        self.workers = list(workers)
        self.offsets, self.world_size = worker_rank_offsets(len(self.workers), tensor_parallel_size)
        self.timeout_s = timeout_s
        self.version: int | None = None

    def _all(self, what: str, calls: list) -> list:
        return wait(calls, f"rollout workers 0..{len(self.workers) - 1}: {what}", self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        for w in self.workers:  # this process may still see a restarted worker as restarting: wait until it answers
            wait_alive(w.version.remote, "rollout worker before joining the weight-transfer group")
        self._all("joining the weight-transfer group",
                  [w.init_weight_transfer.remote({**init_info, "rank_offset": off, "world_size": self.world_size})
                   for w, off in zip(self.workers, self.offsets)])

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
    """vLLM's NCCL weight transfer from every policy rank (rank 0 sends) to every rollout worker."""

    def __init__(self, policy: Sequence[Any], rollout: Sequence[Any], tensor_parallel_size: int, rendezvous):
        self.policy, self.rollout = list(policy), list(rollout)
        self.tp = int(tensor_parallel_size)
        self.rendezvous = rendezvous  # () -> (address, free port) on policy rank 0's node
        self.version: int | None = None
        self.ready = False

    def _connect(self) -> None:
        """(Re)build the transfer group: every policy rank and every rollout worker, on a fresh port."""
        addr, port = self.rendezvous()
        client = RolloutClient(self.rollout, self.tp)
        log.info("weight-transfer group: %s:%d, %d ranks", addr, port, client.world_size)
        wait([p.init_weight_transfer.remote(addr, port, client.world_size, client) for p in self.policy],
             f"policy ranks and rollout workers building the weight-transfer group at {addr}:{port}",
             SYNC_TIMEOUT_S)
        self.ready = True

    def sync(self, version: int) -> int:
        if self.ready and self.version is not None:
            for worker in self.rollout:  # a worker restarted since the last sync is back at "default" (0)
                _wait_alive(worker)
            if set(wait([w.version.remote() for w in self.rollout], "rollout workers reporting their version",
                        60)) != {self.version}:
                log.warning("a rollout worker restarted since version %d: rebuilding the transfer group", self.version)
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
        _wait_alive(worker)
        self.ready = False
        if self.version is not None:
            self.sync(self.version)


def _wait_alive(worker: Any, timeout_s: float = RESTART_TIMEOUT_S) -> None:
    wait_alive(worker.version.remote, "restarted rollout worker", timeout_s)


def _checked(versions: Sequence[int], version: int) -> int:
    if set(versions) != {version}:
        raise RuntimeError(f"rollout workers report weight versions {list(versions)}, expected {version}")
    log.debug("weights version %d on %d rollout workers", version, len(versions))
    return version


def make_weight_sync(backend: str, trainer_gpus: float, policy, rollout, tensor_parallel_size: int,
                     rendezvous, folder: str | Path):
    """The strategy for this run: object store (transformers), NCCL (vLLM + GPU trainers), else folder."""
    if backend != "vllm":
        return ObjectStoreSync(policy, rollout)
    if trainer_gpus > 0:
        return NcclSync(policy, rollout, tensor_parallel_size, rendezvous)
    return FolderSync(policy, rollout, folder)
