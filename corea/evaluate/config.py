"""Evaluation configuration: validated YAML (pydantic); an invalid file fails before Ray starts and names the field.

Model roles (each optional except ``llm``; a system whose model is absent is left out of every table):

    slm_verb   the base SLM (SLM-Verb; also the Router's base model)
    rlvr       the RLVR-trained SLM (RLVR-SLM-Verb, -AvgProb, -Probe, Router + RLVR-SLM)
    brier      the SLM trained with the Brier confidence reward (Brier-SLM-Verb)
    corea      the SLM trained with RLCC, L1 (COREA)
    llm        the large model answering deferred queries

A model path ``tiny:slm`` / ``tiny:llm`` builds a tiny random checkpoint under ``output_dir/models``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import Field, field_validator, model_validator

from corea.configfile import ConfigError, StrictModel, load_config_file  # noqa: F401 (ConfigError re-exported)
from corea.cost import MAX_THRESHOLD, QWEN_32B_OVER_7B
from corea.train.sft import SFTConfig

ROLES = ("slm_verb", "rlvr", "brier", "corea", "llm")
DEFAULT_DATASETS = ("deepmath500", "math500", "gsm8k", "olympiadbench", "gpqa", "commonsenseqa")


class ModelSpec(StrictModel):
    """One checkpoint and how to run it (a bare string in YAML is the path)."""

    path: str
    seed: int = 0  # tiny checkpoints only
    backend: Literal["transformers", "vllm"] | None = None  # None: engine.backend
    options: dict = Field(default_factory=dict)  # merged over engine.options
    num_gpus: float | None = Field(None, ge=0)  # per engine replica; None: engine.num_gpus

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"path": value} if isinstance(value, str) else value


class ModelsConfig(StrictModel):
    slm_verb: ModelSpec | None = None
    rlvr: ModelSpec | None = None
    brier: ModelSpec | None = None
    corea: ModelSpec | None = None
    llm: ModelSpec

    def configured(self) -> dict[str, ModelSpec]:
        return {role: spec for role in ROLES if (spec := getattr(self, role)) is not None}


class DatasetItem(StrictModel):
    """A registered dataset (``corea.data.DATASETS``), read from ``path`` or its shipped fixture."""

    name: str
    path: str | None = None
    split: str | None = None
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from corea.data import DATASETS

        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(sorted(DATASETS))}")
        return name


class GenerationConfig(StrictModel):
    runs: int = Field(10, ge=1, description="k independent samples per question")
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(4096, ge=1)


class EngineConfig(StrictModel):
    """Ray Data batch inference: ``concurrency`` engine replicas, ``batch_size`` questions per call."""

    backend: Literal["transformers", "vllm"] = "transformers"
    options: dict = Field(default_factory=dict)  # load_engine options / vLLM engine_kwargs
    concurrency: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    grade_concurrency: int = Field(1, ge=1)
    grade_cpus: float = Field(0.5, gt=0)


class CascadeConfig(StrictModel):
    size_ratio: float = Field(QWEN_32B_OVER_7B, gt=0, description="N_LLM / N_SLM")
    threshold: Union[float, Literal["llm_pass_at_1"]] = "llm_pass_at_1"
    sweep_step: float = Field(0.05, gt=0, le=MAX_THRESHOLD)

    @field_validator("threshold")
    @classmethod
    def _in_range(cls, value):
        if isinstance(value, float) and not 0.0 <= value <= MAX_THRESHOLD:
            raise ValueError(f"threshold must be in [0, {MAX_THRESHOLD}] or 'llm_pass_at_1'")
        return value


class SelectionConfig(StrictModel):
    """Choose tau on a calibration split of the questions, report it on the held-out rest."""

    enabled: bool = True
    calibration_fraction: float = Field(0.5, gt=0, lt=1)
    max_drops: list[float] = Field(default_factory=lambda: [0.01, 0.02], description="pass@1 drop vs the LLM")
    cost_budgets: list[float] = Field(default_factory=lambda: [0.8], description="relative cost (LLM-only = 1)")
    step: float = Field(0.01, gt=0, le=MAX_THRESHOLD)

    @field_validator("max_drops", "cost_budgets")
    @classmethod
    def _non_negative(cls, values: list[float]) -> list[float]:
        if any(v < 0 for v in values):
            raise ValueError("targets must be >= 0")
        return values


class MetricsConfig(StrictModel):
    n_boot: int = Field(1000, ge=10)
    level: float = Field(0.95, gt=0, lt=1)
    n_bins: int = Field(10, ge=1)


class TrainQuestions(StrictModel):
    """The questions the Probe and the Router learn from (the DeepMath training split by default)."""

    dataset: str = "deepmath"
    path: str | None = None
    split: str | None = "train"
    limit: int | None = Field(None, ge=1)
    samples: int = Field(8, ge=1, description="RLVR-SLM samples per training question")
    temperature: float = Field(0.6, ge=0)


class ProbeConfig(StrictModel):
    """RLVR-SLM-Probe: MLP on mean-pooled last-layer hidden states; ``path`` reuses a trained probe."""

    path: str | None = None
    hidden: tuple[int, int] = (2048, 1024)
    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    max_length: int = Field(8192, ge=8, description="tokens of prompt + response fed to the SLM")
    feature_batch_size: int = Field(4, ge=1)
    num_gpus: float = Field(0, ge=0)
    workers: int = Field(1, ge=1)
    use_gpu: bool = False


class RouterConfig(StrictModel):
    """Router + RLVR-SLM: ``base_model`` (default models.slm_verb) fine-tuned to predict P(SLM correct)."""

    path: str | None = None  # an already trained router checkpoint
    base_model: str | None = None
    sft: SFTConfig = Field(default_factory=SFTConfig)
    max_tokens: int = Field(16, ge=1)


class BaselinesConfig(StrictModel):
    train_questions: TrainQuestions = Field(default_factory=TrainQuestions)
    probe: ProbeConfig | None = None
    router: RouterConfig | None = None


class StrategiesEvalConfig(StrictModel):
    """Online evaluation of collaboration strategies (``corea.evaluate.online``): the SLM role answers first,
    ``models.llm`` is the LLM. Questions are split per (seed, dataset, id) into train (stepwise policy),
    calibration (STEER's mixture, every threshold) and held-out (reported)."""

    names: list[Literal["cascade", "steer", "stepwise_policy", "cope"]] = Field(
        default_factory=lambda: ["cascade", "steer", "stepwise_policy", "cope"], min_length=1)
    slm: str = "corea"  # the models role of the SLM
    train_fraction: float = Field(0.3, ge=0, lt=1)
    calibration_fraction: float = Field(0.3, gt=0, lt=1)
    max_drop: float = Field(0.02, ge=0, description="tau: cheapest within this pass@1 drop vs LLM-only")
    sweep_step: float = Field(0.1, gt=0, le=1.1)
    max_steps: int = Field(16, ge=1)
    max_step_tokens: int = Field(64, ge=1)
    aggregate: Literal["first", "mean", "min", "gmean"] = "min"
    lookahead: int | None = Field(None, ge=1)
    policy_iterations: int = Field(8, ge=1)
    policy_lambda: float = Field(0.3, ge=0)

    @model_validator(mode="after")
    def _fractions(self) -> "StrategiesEvalConfig":
        if self.train_fraction + self.calibration_fraction >= 1:
            raise ValueError("train_fraction + calibration_fraction must leave held-out questions")
        return self


class EvalConfig(StrictModel):
    name: str = "eval"
    seed: int = 0  # sampling seeds, bootstrap resamples, calibration split
    split_seed: int = Field(0, description="seed of the DeepMath train/eval split: the training config's seed")
    output_dir: str = "runs/eval"
    models: ModelsConfig
    datasets: list[DatasetItem] = Field(default_factory=lambda: [DatasetItem(name=n) for n in DEFAULT_DATASETS])
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    cascade: CascadeConfig = Field(default_factory=CascadeConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    strategies: StrategiesEvalConfig | None = None  # online collaboration strategies beside the cascade
    progress: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "EvalConfig":
        names = [d.name for d in self.datasets]
        if not names:
            raise ValueError("datasets: at least one dataset is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"datasets: listed twice: {sorted({n for n in names if names.count(n) > 1})}")
        b = self.baselines
        if (b.probe is not None or b.router is not None) and self.models.rlvr is None:
            raise ValueError("baselines.probe / baselines.router need models.rlvr")
        if b.router is not None and b.router.path is None and b.router.base_model is None and self.models.slm_verb is None:
            raise ValueError("baselines.router needs router.path, router.base_model or models.slm_verb")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir)


def load_eval_config(path: str | Path, overrides: dict | None = None) -> EvalConfig:
    """Read and validate an evaluation YAML; ``overrides`` are dotted keys (``generation.runs``) set on top,
    string values parsed as YAML (``"2"`` -> 2)."""
    return load_config_file(path, EvalConfig, overrides)
