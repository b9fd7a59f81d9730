"""Where the training actors go: the placement group's bundles and the rollout engines' executor options.

One bundle per rollout worker, then one per policy rank, then the reference model. A vLLM rollout engine with
tensor parallelism TP > 1 takes ONE bundle of TP GPUs and runs vLLM's ``mp`` executor backend inside it
(``corea.engines.vllm_engine.engine_args`` says why ``mp`` and not vLLM's Ray pattern of one-GPU bundles with
``VLLM_RAY_BUNDLE_INDICES``): left unset inside a placement group, vLLM would pick ``ray`` and refuse the bundle.
"""

from __future__ import annotations

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


def training_bundles(cfg: TrainConfig) -> list[dict[str, float]]:
    """Bundles of the training placement group (rollout workers, policy ranks, reference), in that order."""
    r = cfg.resources
    bundles = (
        [{"CPU": r.rollout_cpus, "GPU": r.rollout_gpus} for _ in range(r.rollout_workers)]
        + [{"CPU": r.trainer_cpus, "GPU": r.trainer_gpus} for _ in range(r.trainers)]
        + [{"CPU": r.reference_cpus, "GPU": r.reference_gpus}]
    )
    return [{k: v for k, v in b.items() if v > 0} or {"CPU": 0.01} for b in bundles]
