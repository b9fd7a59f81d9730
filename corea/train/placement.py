"""Where the training actors go: placement groups, their bundles, and the rollout engines' executor options.

Bundles: one per rollout engine (its TP GPUs, so one engine's workers stay on one node), one per policy rank,
one per reference shard (or none: with ``resources.reference_with_policy`` each policy rank's bundle also holds
a reference shard that shares its GPU).

Layout. Without ``resources.gpus_per_node`` everything is one placement group with
``resources.placement_strategy`` (a single machine, the tiny configs). With it (the GPU configs) the bundles
go into node-sized STRICT_PACK groups, each of at most ``gpus_per_node`` GPUs: policy ranks first, filling whole
nodes (DeepSpeed's collectives stay inside a node where the ranks fit one), then the rollout engines, then the
reference shards in the room left. One PACK group cannot promise that: Ray's GCS orders a PACK group's bundles
by GPUs, then CPUs (``BundlePackSchedulingPolicy``), not as listed, and fills one node before the next, so on two
p5en nodes the policy ranks of a 7-rollout + 8-policy group were split across both. The autoscaler turns each
pending STRICT_PACK group into one node-sized demand and starts a node for it.

A vLLM rollout engine with TP > 1 takes ONE bundle of TP GPUs and runs vLLM's ``mp`` executor inside it
(``corea.engines.vllm_engine.engine_args`` says why ``mp`` and not vLLM's Ray pattern of one-GPU bundles with
``VLLM_RAY_BUNDLE_INDICES``): left unset inside a placement group, vLLM would pick ``ray`` and refuse the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from corea.configfile import ConfigError
from corea.train.config import TrainConfig


def rollout_engine_options(cfg: TrainConfig) -> dict:
    """The engine options a rollout worker is built with, checked against its bundle."""
    options = dict(cfg.engine.options)
    if cfg.engine.backend != "vllm":
        return options
    tp = int(options.get("tensor_parallel_size", 1))
    gpus = cfg.resources.rollout_gpus
    if gpus and gpus != tp:
        raise ConfigError(
            f"resources.rollout_gpus ({gpus}) must equal engine.options.tensor_parallel_size ({tp}): a vLLM "
            "rollout worker holds exactly its tensor-parallel GPUs"
        )
    backend = options.get("distributed_executor_backend")
    if tp > 1 and backend not in (None, "mp"):
        raise ConfigError(
            f"engine.options.distributed_executor_backend={backend!r}: a TP > 1 rollout engine runs inside the "
            "training placement group on the 'mp' backend (vLLM's Ray executor refuses bundles of several GPUs)"
        )
    if tp > 1:
        options["distributed_executor_backend"] = "mp"
    return options


@dataclass(frozen=True)
class Slot:
    """A bundle: placement group ``group``, bundle ``bundle`` in it."""

    group: int
    bundle: int


@dataclass
class TrainingLayout:
    """The placement groups of one run (``groups[i]``: bundles, all with ``strategy``) and each actor's slot."""

    strategy: str
    groups: list[list[dict[str, float]]] = field(default_factory=list)
    policy: list[Slot] = field(default_factory=list)
    rollout: list[Slot] = field(default_factory=list)
    reference: list[Slot] = field(default_factory=list)  # == policy with reference_with_policy

    def add(self, bundle: dict[str, float], group: int | None = None) -> Slot:
        if group is None:
            self.groups.append([])
            group = len(self.groups) - 1
        self.groups[group].append({k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.01})
        return Slot(group, len(self.groups[group]) - 1)


def actor_gpus(cfg: TrainConfig) -> tuple[float, float]:
    """GPUs a policy rank and a reference shard ask for: with ``reference_with_policy`` the two share the
    rank's ``trainer_gpus`` (the reference takes ``reference_gpus`` of it, Ray's fractional GPUs)."""
    r = cfg.resources
    if not r.reference_with_policy:
        return r.trainer_gpus, r.reference_gpus
    if r.trainer_gpus and not 0 < r.reference_gpus < r.trainer_gpus:
        raise ConfigError(
            f"resources.reference_gpus ({r.reference_gpus}) must lie between 0 and resources.trainer_gpus "
            f"({r.trainer_gpus}) with reference_with_policy: it is the reference shard's share of the rank's GPU")
    if not r.trainer_gpus and r.reference_gpus:
        raise ConfigError("resources.reference_gpus must be 0 with reference_with_policy and CPU policy ranks")
    return r.trainer_gpus - r.reference_gpus, r.reference_gpus


def reference_shards(cfg: TrainConfig) -> int:
    r = cfg.resources
    return r.trainers if r.reference_with_policy else r.reference_actors


def training_layout(cfg: TrainConfig) -> TrainingLayout:
    """The placement groups and every actor's bundle (see the module docstring)."""
    r = cfg.resources
    actor_gpus(cfg)  # checks the shared-GPU split
    extra_cpus = r.reference_cpus if r.reference_with_policy else 0
    policy = {"CPU": r.trainer_cpus + extra_cpus, "GPU": r.trainer_gpus}
    rollout = {"CPU": r.rollout_cpus, "GPU": r.rollout_gpus}
    reference = {"CPU": r.reference_cpus, "GPU": r.reference_gpus}
    node = r.gpus_per_node
    if node is None:
        layout = TrainingLayout(r.placement_strategy, groups=[[]])
        layout.policy = [layout.add(policy, 0) for _ in range(r.trainers)]
        layout.rollout = [layout.add(rollout, 0) for _ in range(r.rollout_workers)]
        if not r.reference_with_policy:
            layout.reference = [layout.add(reference, 0) for _ in range(r.reference_actors)]
    else:
        for name, bundle in (("trainer_gpus", policy), ("rollout_gpus", rollout),
                             *([] if r.reference_with_policy else [("reference_gpus", reference)])):
            if not 0 < bundle["GPU"] <= node:
                raise ConfigError(f"resources.{name} ({bundle['GPU']}) must be > 0 and at most "
                                  f"resources.gpus_per_node ({node}) to be placed in node-sized groups")
        layout = TrainingLayout("STRICT_PACK")
        used: list[float] = []

        def place(bundle: dict[str, float], first_group: int) -> Slot:
            """First fit over the groups from ``first_group`` on; a new node-sized group when none has room."""
            for g in range(first_group, len(layout.groups)):
                if used[g] + bundle["GPU"] <= node:
                    used[g] += bundle["GPU"]
                    return layout.add(bundle, g)
            used.append(bundle["GPU"])
            return layout.add(bundle)

        layout.policy = [place(policy, 0) for _ in range(r.trainers)]
        after_policy = len(layout.groups)  # rollout engines never join a policy node group
        layout.rollout = [place(rollout, after_policy) for _ in range(r.rollout_workers)]
        if not r.reference_with_policy:
            layout.reference = [place(reference, after_policy) for _ in range(r.reference_actors)]
    if r.reference_with_policy:
        layout.reference = list(layout.policy)
    return layout


def training_bundles(cfg: TrainConfig) -> list[dict[str, float]]:
    """Every bundle of the run, by role: rollout engines, policy ranks, then separate reference shards."""
    layout = training_layout(cfg)
    slots = [*layout.rollout, *layout.policy, *([] if cfg.resources.reference_with_policy else layout.reference)]
    return [layout.groups[s.group][s.bundle] for s in slots]
