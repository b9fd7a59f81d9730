"""RLCC training configuration: validated YAML (pydantic), checked before any actor starts.

A model path of the form ``tiny:slm`` or ``tiny:llm`` builds a tiny random checkpoint on the spot (under
``output.dir/models``); anything else is a local folder or an object-storage URI of a Hugging Face checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from corea.configfile import ConfigError, StrictModel, load_config_file  # noqa: F401 (ConfigError re-exported)

from corea.rewards import CONFIDENCE_REWARDS, RewardWeights


class ModelConfig(StrictModel):
    policy: str = "tiny:slm"
    reference: str | None = None  # defaults to the policy's initial weights
    seed: int = 0  # for tiny checkpoints


class EngineConfig(StrictModel):
    backend: Literal["transformers", "vllm"] = "transformers"
    options: dict = Field(default_factory=dict)  # passed to load_engine (dtype, tensor_parallel_size, ...)


class DataConfig(StrictModel):
    dataset: str = "synthetic_sums"  # a registered dataset name
    path: str | None = None  # None: the shipped fixture
    split: str | None = "train"
    limit: int | None = Field(None, ge=1)


class RewardConfig(StrictModel):
    confidence_reward: str = "l1"
    weights: RewardWeights = Field(default_factory=RewardWeights)
    grading_timeout_s: float = Field(1.0, gt=0, le=60, description="per-response math-verify deadline, seconds")

    @model_validator(mode="after")
    def _known(self) -> "RewardConfig":
        if self.confidence_reward not in CONFIDENCE_REWARDS:
            raise ValueError(f"confidence_reward must be one of {sorted(CONFIDENCE_REWARDS)}")
        return self


class RolloutConfig(StrictModel):
    n: int = Field(8, ge=2, description="responses per prompt (the group size G)")
    prompts_per_step: int = Field(8, ge=1, description="rollout batch, in prompts")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, ge=1)
    max_staleness: int = Field(
        0, ge=0,
        description="0: each step rolls out with the weights it trains (synchronous); k >= 1: step j+1..j+k roll out "
                    "while step j trains, and a batch is trained on at most k weight versions after the one it was "
                    "sampled with (see corea.train.pipeline)")


class AdvantageConfig(StrictModel):
    std_normalize: bool = Field(True, description="divide by the group's reward std (GRPO); false: Dr. GRPO")
    filter_groups: Literal["none", "zero_std"] = Field(
        "none", description="zero_std: drop groups whose total rewards are all equal (DAPO's dynamic sampling)")
    refill: bool = Field(False, description="with filter_groups: roll out further prompts until the batch is full")
    max_refill_rounds: int = Field(4, ge=1, description="refill rounds per step; then zero-advantage groups fill the rest")


class OptimConfig(StrictModel):
    steps: int = Field(2, ge=1)
    train_batch_prompts: int = Field(8, ge=1, description="prompts per optimizer step")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward/backward")
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, gt=0)
    clip_eps: float = Field(0.2, gt=0)
    kl_coef: float = Field(0.001, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    loss_norm_tokens: int | None = Field(
        None, ge=1, description="N of seq_mean_token_sum_norm; None: rollout.max_tokens")
    importance_cap: float | None = Field(
        None, gt=0, description="with rollout.max_staleness >= 1: the PPO ratio is taken against the trainer's "
                                "log-probs and each token weighted by min(pi_trainer / pi_rollout, cap) (truncated "
                                "importance sampling); None: the ratio is taken against the rollout's log-probs")

    @model_validator(mode="after")
    def _precision_fits(self) -> "OptimConfig":
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("precision bf16 needs zero_stage >= 1 (DeepSpeed accumulates bf16 gradients in fp32 "
                             "only in its ZeRO/BF16 optimizers)")
        return self


class ResourcesConfig(StrictModel):
    rollout_workers: int = Field(1, ge=1)
    rollout_cpus: float = Field(1, ge=0)
    rollout_gpus: float = Field(0, ge=0)
    reward_actors: int = Field(1, ge=1)
    reward_cpus: float = Field(1, ge=0)
    trainers: int = Field(1, ge=1, description="data-parallel DeepSpeed ranks")
    trainer_cpus: float = Field(1, ge=0)
    trainer_gpus: float = Field(0, ge=0)
    reference_cpus: float = Field(1, ge=0)
    reference_gpus: float = Field(0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    reference_actors: int = Field(1, ge=1, description="reference shards, each scoring an equal slice of the batch")
    reference_with_policy: bool = Field(
        False, description="one reference shard in each policy rank's bundle, on its GPU (reference_gpus of it); "
                           "reference_actors is then the number of ranks")
    gpus_per_node: int | None = Field(
        None, ge=1, description="GPUs of one node: bundles go into node-sized STRICT_PACK placement groups, policy "
                                "ranks first (see corea.train.placement); None: one group, placement_strategy")
    placement_timeout_s: float = Field(
        2700, gt=0, description="wait for the placement groups, seconds: the autoscaler starting GPU nodes from zero")
    placement_log_every_s: float = Field(60, gt=0, description="seconds between logs of what is still unplaced")
    actor_start_timeout_s: float = Field(
        1800, gt=0, description="every actor's constructor (a cold TP 4 vLLM engine loading a 32B model), seconds")
    worker_restart_timeout_s: float = Field(
        1800, gt=0, description="a restarted rollout worker coming back (vLLM start-up), seconds")


class OutputConfig(StrictModel):
    dir: str = "runs/tiny-rlcc"
    checkpoint_uri: str | None = Field(
        None, description="checkpoints under this URI (s3://bucket/run/checkpoints, see corea.storage) instead of "
                          "dir/checkpoints: every node uploads its part, a COMPLETE marker last")
    checkpoint_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    tensorboard: bool = True
    log_every: int = Field(10, ge=1, description="steps between one-line summaries (every step goes to metrics.jsonl)")


class TrainConfig(StrictModel):
    name: str = "rlcc"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _batches_fit(self) -> "TrainConfig":
        if self.rollout.prompts_per_step % self.optim.train_batch_prompts:
            raise ValueError(
                f"optim.train_batch_prompts ({self.optim.train_batch_prompts}) must divide "
                f"rollout.prompts_per_step ({self.rollout.prompts_per_step})"
            )
        per_rank = self.optim.train_batch_prompts * self.rollout.n
        if per_rank % (self.resources.trainers * self.optim.micro_batch_size):
            raise ValueError(
                f"a train batch of {per_rank} sequences does not split into {self.resources.trainers} trainers x "
                f"micro-batches of {self.optim.micro_batch_size} (optim.micro_batch_size)"
            )
        if self.advantage.refill and self.advantage.filter_groups == "none":
            raise ValueError("advantage.refill needs advantage.filter_groups: zero_std")
        if self.optim.importance_cap is not None and self.rollout.max_staleness == 0:
            raise ValueError("optim.importance_cap applies only with rollout.max_staleness >= 1")
        if self.optim.loss_norm_tokens is None:
            self.optim.loss_norm_tokens = self.rollout.max_tokens
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.output.dir)


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read and validate a training YAML; ``overrides`` are dotted keys (``optim.steps``) applied on top."""
    return load_config_file(path, TrainConfig, overrides)
