"""Starting the training actors on the cluster and calling them with restart-and-retry.

Rollout workers, policy ranks and reference shards are placed with the placement groups of
``corea.train.placement.training_layout``; the driver waits for them as long as the autoscaler may take to start
GPU nodes from zero (``resources.placement_timeout_s``), logging what is still unplaced and the cluster's nodes.
Reward actors are plain CPU actors, outside the groups (cluster.yaml's head offers no CPU, so they run on the
worker nodes). Rollout and reward actors restart on failure (``max_restarts=-1``); a call that fails because its
actor died is retried once the actor is back, after the rollout worker has been given the current weights
again, so a step is redone, never lost or doubled.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from corea.engines import SamplingParams
from corea.train.actors import PolicyActor, ReferenceActor, RewardActor, RolloutWorker, rendezvous_address
from corea.train.config import TrainConfig
from corea.train.placement import TrainingLayout, actor_gpus, rollout_engine_options, training_layout
from corea.train.weight_sync import DRAIN_TIMEOUT_S, make_weight_sync, wait_alive
from corea.train.sequences import RolloutSequence

log = logging.getLogger(__name__)
ACTOR_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError)
MAX_RETRIES = 3


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


def cluster_view() -> str:
    """One line on the cluster: alive nodes with their resources, what is free, and the autoscaler's pending
    launches and failed nodes (its status record in the GCS, where an autoscaler runs)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    shown = ", ".join(f"{n['NodeManagerAddress']} {{{_brief(n['Resources'])}}}" for n in nodes)
    line = f"{len(nodes)} nodes alive: {shown}; free: {{{_brief(ray.available_resources())}}}"
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        report = json.loads(status).get("autoscaler_report") or {} if status else {}
        if report:
            line += (f"; autoscaler: active {report.get('active_nodes')}, launching {report.get('pending_launches')}, "
                     f"pending {report.get('pending_nodes')}, failed {report.get('failed_nodes')}")
    except Exception as exc:  # noqa: BLE001 (the view is for the log; no autoscaler status is no error)
        log.debug("no autoscaler status: %s", exc)
    return line


def _brief(resources: dict) -> str:
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())
                     if k in ("CPU", "GPU") or k.startswith("accelerator_type"))


def place(layout: TrainingLayout, name: str, timeout_s: float, log_every_s: float) -> list[PlacementGroup]:
    """Create the layout's placement groups and wait until every one is placed, logging every ``log_every_s``
    which are pending and the cluster's state; after ``timeout_s`` remove them and raise, naming what could not
    be placed."""
    groups = [placement_group(bundles, strategy=layout.strategy, name=f"{name}-pg{i}")
              for i, bundles in enumerate(layout.groups)]
    ready = {g.ready(): i for i, g in enumerate(groups)}
    began = time.monotonic()
    while ready:
        left = timeout_s - (time.monotonic() - began)
        done, _ = ray.wait(list(ready), num_returns=len(ready), timeout=max(0.0, min(log_every_s, left)))
        for ref in done:
            ray.get(ref)
            ready.pop(ref)
        if not ready:
            break
        pending = [f"group {i} {layout.strategy} {layout.groups[i]} "
                   f"({placement_group_table(groups[i])['stats']['scheduling_state']})" for i in sorted(ready.values())]
        if time.monotonic() - began >= timeout_s:
            view = cluster_view()
            for g in groups:
                remove_placement_group(g)
            raise RuntimeError(
                f"the cluster cannot place {len(pending)} of {len(groups)} placement groups within {timeout_s:.0f} s "
                f"(resources.placement_timeout_s): {'; '.join(pending)}. Cluster: {view}. Check the autoscaler's "
                "node types and max_workers (and the account's GPU quota), or lower resources.* in the config")
        log.info("waiting %.0f s for placement (autoscaler starting nodes?): %s. Cluster: %s",
                 time.monotonic() - began, "; ".join(pending), cluster_view())
    log.info("placed %d placement groups in %.0f s", len(groups), time.monotonic() - began)
    return groups


class ClusterActors:
    """Every actor of one training run."""

    def __init__(self, cfg: TrainConfig, policy_path: str, reference_path: str, run_name: str):
        r = cfg.resources
        self.cfg = cfg
        layout = training_layout(cfg)
        engine_options = rollout_engine_options(cfg)  # checked before anything is placed
        policy_gpus, reference_gpus = actor_gpus(cfg)
        self.pgs = place(layout, run_name, r.placement_timeout_s, r.placement_log_every_s)

        def at(slot) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(self.pgs[slot.group], placement_group_bundle_index=slot.bundle)

        e = cfg.engine
        self.rollout = [
            ray.remote(RolloutWorker)
            .options(name=f"{run_name}-rollout-{i}", num_cpus=r.rollout_cpus, num_gpus=r.rollout_gpus,
                     max_restarts=-1, scheduling_strategy=at(slot))
            .remote(policy_path, e.backend, engine_options)
            for i, slot in enumerate(layout.rollout)
        ]
        self.inflight: list[Any] = []  # generate calls not yet known to be finished (see drain)
        self.reward = [
            ray.remote(RewardActor)
            .options(name=f"{run_name}-reward-{i}", num_cpus=r.reward_cpus, max_restarts=-1)
            .remote(cfg.reward.confidence_reward, cfg.reward.weights.model_dump(), cfg.reward.grading_timeout_s,
                    max(1, int(r.reward_cpus)))  # as many grading workers as the actor has CPUs
            for i in range(r.reward_actors)
        ]
        first_trainer = layout.policy[0]
        addr, port = rendezvous_address(at(first_trainer))
        per_rank = cfg.optim.train_batch_prompts * cfg.rollout.n // r.trainers
        self.policy = [
            ray.remote(PolicyActor)
            .options(name=f"{run_name}-policy-{k}", num_cpus=r.trainer_cpus, num_gpus=policy_gpus,
                     scheduling_strategy=at(slot))
            .remote(policy_path, cfg.optim, per_rank, k, r.trainers, addr, port, cfg.seed)
            for k, slot in enumerate(layout.policy)
        ]
        self.references = [  # shards of the frozen reference, each scoring a contiguous slice of the batch
            ray.remote(ReferenceActor)
            .options(name=f"{run_name}-reference-{j}", num_cpus=r.reference_cpus, num_gpus=reference_gpus,
                     scheduling_strategy=at(slot))
            .remote(reference_path, cfg.optim.micro_batch_size)
            for j, slot in enumerate(layout.reference)
        ]
        self.weights = make_weight_sync(
            e.backend, r.trainer_gpus, self.policy, self.rollout, int(e.options.get("tensor_parallel_size", 1)),
            lambda: rendezvous_address(at(first_trainer)), cfg.out_dir / "weights",
            restart_timeout_s=r.worker_restart_timeout_s, drain=self.drain)
        self.version = 0  # weight version the rollout workers hold
        # wait for every constructor (model loading, DeepSpeed start-up) so step times measure steps
        actors = [*self.rollout, *self.reward, *self.policy, *self.references]
        ready, waiting = ray.wait([a.__ray_ready__.remote() for a in actors], num_returns=len(actors),
                                  timeout=r.actor_start_timeout_s)
        ray.get(ready)  # raises the error of an actor whose constructor failed
        if waiting:
            raise RuntimeError(
                f"{len(waiting)} actors did not start within {r.actor_start_timeout_s:.0f} s "
                "(resources.actor_start_timeout_s). On CPU, DeepSpeed builds its shared-memory op once under "
                "~/.cache/torch_extensions; a build killed midway leaves a 'lock' file there that blocks every "
                "later start: remove it."
            )

    # --- rollout -------------------------------------------------------------------------------------------
    def _resync(self, worker) -> None:
        wait_alive(worker.version.remote, "rollout worker restarting",  # vLLM start-up can take minutes
                   self.cfg.resources.worker_restart_timeout_s)
        self.weights.resync(worker)

    def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Return once every generate call made so far has finished (or failed), without calling the workers:
        the weight-transfer rebuild needs every rollout worker idle (see ``corea.train.weight_sync``)."""
        self._prune()
        if self.inflight:
            log.info("waiting for %d generate calls in flight before rebuilding the transfer group", len(self.inflight))
            _, self.inflight = ray.wait(self.inflight, num_returns=len(self.inflight), timeout=timeout_s,
                                        fetch_local=False)
            if self.inflight:
                raise TimeoutError(f"rollout workers: {len(self.inflight)} generate calls still running after "
                                   f"{timeout_s:.0f} s")

    def _prune(self) -> None:
        if self.inflight:
            _, self.inflight = ray.wait(self.inflight, num_returns=len(self.inflight), timeout=0, fetch_local=False)

    def generate(self, prompts: Sequence[Any], params: SamplingParams) -> list[dict]:
        """n samples per prompt across the rollout pool, in prompt order, with the current weights."""
        return self.collect(self.submit(prompts, params), self.version)

    def submit(self, prompts: Sequence[Any], params: SamplingParams) -> list[tuple]:
        """Start generating (each prompt's group stays whole on one worker); ``collect`` gathers the result."""
        shards = split_evenly(list(prompts), len(self.rollout))
        return [(i, shard, self._generate(i, shard, params), params) for i, shard in enumerate(shards)]

    def _generate(self, i: int, shard: list, params: SamplingParams):
        self._prune()
        ref = self.rollout[i].generate.remote(shard, params)
        self.inflight.append(ref)
        return ref

    def collect(self, pending: list[tuple], min_version: int) -> list[dict]:
        """The groups of a ``submit``, in prompt order, each sampled with weights version >= ``min_version``.

        A shard is redone if its worker died during the call, or if it answered with older weights (a worker
        restarted between calls starts from the initial checkpoint): it is given the current weights first."""
        out: list[dict] = []
        for i, shard, ref, params in pending:
            worker, first = self.rollout[i], [ref]
            for _ in range(MAX_RETRIES + 1):
                result = _call_with_retry(
                    lambda: first.pop() if first else self._generate(i, shard, params),
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
        """Reference log-probs of every sequence, in order: each shard scores a contiguous slice, all at once."""
        slices = split_evenly(list(sequences), len(self.references))
        parts = ray.get([ref.logprobs.remote(part) for ref, part in zip(self.references, slices)])
        return [lp for part in parts for lp in part]

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
        for actor in [*self.rollout, *self.reward, *self.policy, *self.references]:
            ray.kill(actor, no_restart=True)
        for pg in self.pgs:
            remove_placement_group(pg)
