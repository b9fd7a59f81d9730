"""Starting the training actors on the cluster and calling them with restart-and-retry.

Rollout workers and the reference model and policy ranks are placed with one placement group (bundles from
the config); reward actors are plain CPU actors. Rollout and reward actors restart on failure
(``max_restarts=-1``); a call that fails because its actor died is retried once the actor is back, after the
rollout worker has been given the current weights again, so a step is redone, never lost or doubled.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from corea.engines import SamplingParams
from corea.train.actors import PolicyActor, ReferenceActor, RewardActor, RolloutWorker, rendezvous_address
from corea.train.config import TrainConfig
from corea.train.placement import rollout_engine_options, training_bundles
from corea.train.weight_sync import make_weight_sync, wait_alive
from corea.train.sequences import RolloutSequence

log = logging.getLogger(__name__)
ACTOR_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError)
MAX_RETRIES = 3
PLACEMENT_TIMEOUT_S = 120
STARTUP_TIMEOUT_S = 900


def split_evenly(items: Sequence, parts: int) -> list[list]:
    """Contiguous shards whose sizes differ by at most one (empty shards dropped)."""
    size, extra = divmod(len(items), parts)
    shards, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        shards.append(list(items[start:end]))
        start = end
    return [s for s in shards if s]


def _call_with_retry(call: Callable[[], Any], recover: Callable[[], None], what: str) -> Any:
    for attempt in range(MAX_RETRIES + 1):
        try:
            return ray.get(call())
        except ACTOR_FAILURES as exc:
            if attempt == MAX_RETRIES:
                raise
            log.warning("%s failed (%s); restarting it and redoing the call (attempt %d)", what, type(exc).__name__, attempt + 1)
            recover()


class ClusterActors:
    """Every actor of one training run."""

    def __init__(self, cfg: TrainConfig, policy_path: str, reference_path: str, run_name: str):
        r = cfg.resources
        self.cfg = cfg
        bundles = training_bundles(cfg)
        engine_options = rollout_engine_options(cfg)  # checked before anything is placed
        self.pg = placement_group(bundles, strategy=r.placement_strategy, name=f"{run_name}-pg")
        try:
            ray.get(self.pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as exc:
            remove_placement_group(self.pg)
            raise RuntimeError(f"the cluster cannot place {bundles} within {PLACEMENT_TIMEOUT_S} s; lower resources.* in the config") from exc

        def at(i: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)

        e = cfg.engine
        self.rollout = [
            ray.remote(RolloutWorker)
            .options(name=f"{run_name}-rollout-{i}", num_cpus=r.rollout_cpus, num_gpus=r.rollout_gpus,
                     max_restarts=-1, scheduling_strategy=at(i))
            .remote(policy_path, e.backend, engine_options)
            for i in range(r.rollout_workers)
        ]
        self.reward = [
            ray.remote(RewardActor)
            .options(name=f"{run_name}-reward-{i}", num_cpus=r.reward_cpus, max_restarts=-1)
            .remote(cfg.reward.confidence_reward, cfg.reward.weights.model_dump(), cfg.reward.grading_timeout_s,
                    max(1, int(r.reward_cpus)))  # as many grading workers as the actor has CPUs
            for i in range(r.reward_actors)
        ]
        first_trainer = r.rollout_workers
        addr, port = rendezvous_address(at(first_trainer))
        per_rank = cfg.optim.train_batch_prompts * cfg.rollout.n // r.trainers
        self.policy = [
            ray.remote(PolicyActor)
            .options(name=f"{run_name}-policy-{k}", num_cpus=r.trainer_cpus, num_gpus=r.trainer_gpus,
                     scheduling_strategy=at(first_trainer + k))
            .remote(policy_path, cfg.optim, per_rank, k, r.trainers, addr, port, cfg.seed)
            for k in range(r.trainers)
        ]
        self.reference = (
            ray.remote(ReferenceActor)
            .options(name=f"{run_name}-reference", num_cpus=r.reference_cpus, num_gpus=r.reference_gpus,
                     scheduling_strategy=at(first_trainer + r.trainers))
            .remote(reference_path, cfg.optim.micro_batch_size)
        )
        self.weights = make_weight_sync(
            e.backend, r.trainer_gpus, self.policy, self.rollout, int(e.options.get("tensor_parallel_size", 1)),
            lambda: rendezvous_address(at(first_trainer)), cfg.out_dir / "weights")
        self.version = 0  # weight version the rollout workers hold
        # wait for every constructor (model loading, DeepSpeed start-up) so step times measure steps
        actors = [*self.rollout, *self.reward, *self.policy, self.reference]
        ready, waiting = ray.wait([a.__ray_ready__.remote() for a in actors], num_returns=len(actors),
                                  timeout=STARTUP_TIMEOUT_S)
        ray.get(ready)  # raises the error of an actor whose constructor failed
        if waiting:
            raise RuntimeError(
                f"{len(waiting)} actors did not start within {STARTUP_TIMEOUT_S} s. On CPU, DeepSpeed builds its "
                "shared-memory op once under ~/.cache/torch_extensions; a build killed midway leaves a 'lock' "
                "file there that blocks every later start: remove it."
            )

    # --- rollout -------------------------------------------------------------------------------------------
    def _resync(self, worker) -> None:
        wait_alive(worker.version.remote, "rollout worker restarting")  # vLLM start-up can take minutes
        self.weights.resync(worker)

    def generate(self, prompts: Sequence[Any], params: SamplingParams) -> list[dict]:
        """n samples per prompt across the rollout pool, in prompt order, with the current weights."""
        return self.collect(self.submit(prompts, params), self.version)

    def submit(self, prompts: Sequence[Any], params: SamplingParams) -> list[tuple]:
        """Start generating (each prompt's group stays whole on one worker); ``collect`` gathers the result."""
        shards = split_evenly(list(prompts), len(self.rollout))
        return [(i, shard, self.rollout[i].generate.remote(shard, params), params) for i, shard in enumerate(shards)]

    def collect(self, pending: list[tuple], min_version: int) -> list[dict]:
        """The groups of a ``submit``, in prompt order, each sampled with weights version >= ``min_version``.

        A shard is redone if its worker died during the call, or if it answered with older weights (a worker
        restarted between calls starts from the initial checkpoint): it is given the current weights first."""
        out: list[dict] = []
        for i, shard, ref, params in pending:
            worker, first = self.rollout[i], [ref]
            for _ in range(MAX_RETRIES + 1):
                result = _call_with_retry(
                    lambda: first.pop() if first else worker.generate.remote(shard, params),
                    lambda: self._resync(worker),
                    f"rollout worker {i}",
                )
                if all(g["weights_version"] >= min_version for g in result):
                    break
                log.warning("rollout worker %d answered with weights older than version %d (restarted?); "
                            "resyncing and redoing", i, min_version)
                self._resync(worker)
            else:
                raise RuntimeError(f"rollout worker {i} keeps answering with stale weights")
            out.extend(result)
        return out

    def sync_weights(self, version: int) -> int:
        """The policy's weights -> every rollout worker, with the strategy of ``corea.train.weight_sync``; every
        policy rank takes part."""
        self.version = self.weights.sync(version)
        return self.version

    # --- reward --------------------------------------------------------------------------------------------
    def score(self, groups: Sequence[tuple]) -> list[list[dict]]:
        """Whole groups go to reward actors (a group is never split)."""
        shards = split_evenly(list(groups), len(self.reward))
        pending = [a.score.remote(s) for a, s in zip(self.reward, shards)]
        out: list[list[dict]] = []
        for i, (actor, shard, ref) in enumerate(zip(self.reward, shards, pending)):
            first = [ref]
            out.extend(
                _call_with_retry(
                    lambda: first.pop() if first else actor.score.remote(shard),
                    lambda: time.sleep(0.5),
                    f"reward actor {i}",
                )
            )
        return out

    # --- reference and policy ------------------------------------------------------------------------------
    def reference_logprobs(self, sequences: Sequence[RolloutSequence]) -> list[list[float]]:
        return ray.get(self.reference.logprobs.remote(list(sequences)))

    def train(self, sequences: Sequence[RolloutSequence], ref_logprobs: Sequence[Sequence[float]],
              behaviour: bool = False) -> list[dict]:
        """Each policy rank trains on an equal, contiguous share of every update's sequences (``behaviour``:
        sampled with older weights, see ``Policy.train``)."""
        ranks = len(self.policy)
        per_update = self.cfg.optim.train_batch_prompts * self.cfg.rollout.n
        shares: list[list[int]] = [[] for _ in range(ranks)]
        for start in range(0, len(sequences), per_update):
            for k, part in enumerate(split_evenly(list(range(start, start + per_update)), ranks)):
                shares[k].extend(part)
        return ray.get(
            [
                p.train.remote([sequences[i] for i in idx], [ref_logprobs[i] for i in idx], behaviour)
                for p, idx in zip(self.policy, shares)
            ]
        )

    def save(self, folder: str) -> None:
        ray.get([p.save.remote(folder) for p in self.policy])

    def load(self, folder: str) -> None:
        ray.get([p.load.remote(folder) for p in self.policy])

    def shutdown(self) -> None:
        for actor in [*self.rollout, *self.reward, *self.policy, self.reference]:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.pg)
