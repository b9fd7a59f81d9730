"""Serving configuration: validated YAML (pydantic), checked before anything is deployed.

One file describes the whole application: the Ray cluster to use, HTTP options, the cascade (threshold, cost
ratio, degradation), request limits, authentication, and one block per deployment (``ingress``, ``slm``,
``llm``) with its replicas or autoscaling range, ``max_ongoing_requests`` and Ray resources. A model of the
form ``tiny:slm``, ``tiny:llm`` or ``tiny:slm-confident`` is a tiny checkpoint built on the spot under
``work_dir/models``; anything else is a Hugging Face checkpoint folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from corea.configfile import ConfigError, StrictModel, load_config_file  # noqa: F401 (ConfigError re-exported)
from corea.cost import MAX_THRESHOLD, QWEN_32B_OVER_7B


class AutoscalingConfig(StrictModel):
    """Ray Serve ``autoscaling_config`` of one deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _range(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        return self


class ResourcesConfig(StrictModel):
    """Ray resources of each replica (``ray_actor_options``)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0, description="bytes of heap memory reserved per replica")
    accelerator_type: str | None = None  # e.g. H200: only nodes with that accelerator host the replica
    custom: dict[str, float] = Field(default_factory=dict)  # custom Ray resources

    def actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            options["memory"] = self.memory
        if self.accelerator_type:
            options["accelerator_type"] = self.accelerator_type
        if self.custom:
            options["resources"] = dict(self.custom)
        return options


class DeploymentConfig(StrictModel):
    """Replicas, concurrency and resources of one Serve deployment.

    ``autoscaling`` (the default) and a fixed ``num_replicas`` are exclusive: set ``autoscaling: null`` to use
    ``num_replicas``.
    """

    num_replicas: int | None = Field(None, ge=0)
    autoscaling: AutoscalingConfig | None = Field(default_factory=AutoscalingConfig)
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(-1, ge=-1, description="-1: unbounded; beyond it requests get 503")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    health_check_period_s: float = Field(10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)

    @model_validator(mode="after")
    def _replicas(self) -> "DeploymentConfig":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling (autoscaling: null for a fixed count)")
        if self.num_replicas is None and self.autoscaling is None:
            raise ValueError("num_replicas is required when autoscaling is null")
        return self

    def serve_options(self, name: str) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        options: dict[str, Any] = dict(
            name=name,
            max_ongoing_requests=self.max_ongoing_requests,
            max_queued_requests=self.max_queued_requests,
            ray_actor_options=self.resources.actor_options(),
            health_check_period_s=self.health_check_period_s,
            graceful_shutdown_timeout_s=self.graceful_shutdown_timeout_s,
        )
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            options["num_replicas"] = self.num_replicas
        return options


class IngressConfig(DeploymentConfig):
    """The HTTP ingress: asyncio only, cheap; it mostly waits on the tiers."""

    max_ongoing_requests: int = Field(256, ge=1)
    resources: ResourcesConfig = Field(default_factory=lambda: ResourcesConfig(num_cpus=0.5))


class BatchingConfig(StrictModel):
    """Micro-batching of concurrent requests into one engine call (transformers backend)."""

    max_batch_size: int = Field(8, ge=1, description="1 disables batching")
    batch_wait_timeout_s: float = Field(0.002, ge=0)


class TierConfig(DeploymentConfig):
    """One model tier (SLM or LLM) and the engine that serves it."""

    model: str = Field(..., min_length=1)
    model_seed: int = 0  # tiny checkpoints only
    backend: Literal["transformers", "vllm"] = "transformers"
    tensor_parallel_size: int = Field(1, ge=1)
    device: Literal["gpu", "cpu"] = Field(
        "gpu", description="vllm: 'gpu' (a replica owns tensor_parallel_size GPUs) or 'cpu' (vLLM's CPU build, "
        "no GPU, KV cache from engine_options.kv_cache_bytes)")
    engine_options: dict[str, Any] = Field(default_factory=dict)  # passed to load_engine
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (transformers)")

    @model_validator(mode="after")
    def _engine(self) -> "TierConfig":
        if "tensor_parallel_size" in self.engine_options:
            raise ValueError("set tensor_parallel_size on the tier, not in engine_options")
        if self.backend == "transformers" and self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 needs backend: vllm")
        if self.backend == "vllm" and self.device == "cpu":
            if self.resources.num_gpus or self.tensor_parallel_size != 1:
                raise ValueError("device: cpu runs vLLM's CPU build: resources.num_gpus must be 0 and "
                                 "tensor_parallel_size 1")
        elif self.backend == "vllm" and self.resources.num_gpus != self.tensor_parallel_size:
            raise ValueError(
                f"resources.num_gpus ({self.resources.num_gpus:g}) must equal tensor_parallel_size "
                f"({self.tensor_parallel_size}): a replica owns its tensor-parallel group's GPUs "
                "(set device: cpu to run vLLM's CPU build without GPUs)"
            )
        return self

    def load_options(self) -> dict[str, Any]:
        """Keyword arguments for ``load_engine`` (vLLM: tensor parallelism and the streaming engine)."""
        options = dict(self.engine_options)
        if self.backend == "vllm":
            options["tensor_parallel_size"] = self.tensor_parallel_size
            options.setdefault("async_engine", True)
        return options


class CascadeConfig(StrictModel):
    """The routing rule: the SLM answers when its confidence c >= threshold, else the LLM does."""

    threshold: float = Field(0.5, ge=0, le=MAX_THRESHOLD, description="default tau; a request may override it")
    cost_ratio: float = Field(QWEN_32B_OVER_7B, gt=0, description="N_LLM / N_SLM for C_LLM")
    degrade_to_slm: bool = False  # LLM down: answer with the SLM (flagged degraded) instead of 503
    model_id: str = "corea-cascade"
    slm_model_id: str = "corea-slm"
    llm_model_id: str = "corea-llm"
    expose_tiers: bool = True  # also serve slm_model_id / llm_model_id, which force one tier

    @model_validator(mode="after")
    def _ids(self) -> "CascadeConfig":
        if len({self.model_id, self.slm_model_id, self.llm_model_id}) < 3:
            raise ValueError("model_id, slm_model_id and llm_model_id must differ")
        return self


class StrategiesConfig(StrictModel):
    """Step-level and plan-based strategies (``corea.collab``); the cascade keeps ``cascade.threshold``."""

    default: Literal["cascade", "steer", "stepwise_policy", "cope"] = "cascade"  # of model_id
    thresholds: dict[Literal["steer", "stepwise_policy", "cope"], float] = Field(
        default_factory=lambda: {"steer": 0.5, "stepwise_policy": 0.5, "cope": 0.5})
    # extra served model ids selecting a strategy, e.g. {"corea-steer": "steer"}
    model_ids: dict[str, Literal["steer", "stepwise_policy", "cope"]] = Field(default_factory=dict)
    mixture_path: str | None = None  # StepMixture JSON (STEER); None compares the raw step confidence
    policy_path: str | None = None  # StepPolicy JSON; without it stepwise_policy requests get 400
    aggregate: Literal["first", "mean", "min", "gmean"] = "min"
    lookahead: int | None = Field(None, ge=1)
    max_steps: int = Field(16, ge=1, le=256)
    max_step_tokens: int = Field(64, ge=1)


class LimitsConfig(StrictModel):
    """Request limits and timeouts."""

    max_body_bytes: int = Field(1 << 20, ge=1024)  # larger bodies get 413
    max_json_depth: int = Field(32, ge=4, le=512)  # deeper JSON nesting gets 400 before it is parsed
    max_prompt_tokens: int = Field(8192, ge=1)  # longer prompts (instruction included) get 400 from the tier
    body_timeout_s: float = Field(10.0, gt=0)  # the whole body must arrive within this (408 otherwise)
    body_min_rate_bps: float = Field(1024.0, gt=0)  # after a 1 s grace, at least this many bytes per second
    max_headers: int = Field(100, ge=8)  # more request headers get 431 (Serve's proxy)
    max_header_bytes: int = Field(32768, ge=1024)  # a longer request line + headers gets 431 (Serve's proxy)
    header_timeout_s: float = Field(10.0, gt=0)  # headers not in within this of their first byte: 408 (proxy)
    max_messages: int = Field(256, ge=1)
    max_tokens: int = Field(4096, ge=1)  # a request asking for more gets 400
    default_max_tokens: int = Field(1024, ge=1)
    default_temperature: float = Field(0.6, ge=0, le=2)  # the paper's evaluation temperature
    slm_timeout_s: float = Field(60.0, gt=0)
    llm_timeout_s: float = Field(120.0, gt=0)  # also the longest gap between two streamed LLM chunks

    @model_validator(mode="after")
    def _defaults_fit(self) -> "LimitsConfig":
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self


class AuthConfig(StrictModel):
    """Bearer API keys: SHA-256 digests listed here and/or keys read from an environment variable
    (comma-separated) when the application is built. Neither set: no authentication."""

    api_keys_env: str | None = None
    api_key_sha256: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _digests(self) -> "AuthConfig":
        for digest in self.api_key_sha256:
            if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
                raise ValueError("api_key_sha256 holds lowercase hex SHA-256 digests (64 characters)")
        return self


class HttpConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = Field("/", pattern=r"^/")
    request_timeout_s: float | None = Field(None, gt=0)  # Serve proxy's end-to-end limit
    keep_alive_timeout_s: int | None = Field(None, ge=1)  # Serve proxy's idle keep-alive (uvicorn's)
    cors_allow_origins: list[str] = Field(default_factory=list)  # empty: no CORS headers (browsers refuse)


class RayConfig(StrictModel):
    """How ``corea serve`` reaches Ray: ``address`` (or ``RAY_ADDRESS``), else a new local cluster."""

    address: str | None = None
    num_cpus: float | None = Field(None, gt=0)
    num_gpus: int | None = Field(None, ge=0)
    include_dashboard: bool = False


class MetricsConfig(StrictModel):
    ray_export: bool = False  # also record Ray metrics (cluster-wide, via Ray's Prometheus export)


class DirectSLMConfig(StrictModel):
    """A second application serving the SLM alone (same schema, no cascade): the baseline of bench/serve.py."""

    app_name: str = "corea-slm-direct"
    route_prefix: str = Field("/slm", pattern=r"^/")


class ServeConfig(StrictModel):
    name: str = Field("corea", min_length=1)  # Serve application name
    work_dir: str = "runs/serve"  # tiny checkpoints are built under work_dir/models
    ray: RayConfig = Field(default_factory=RayConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    cascade: CascadeConfig = Field(default_factory=CascadeConfig)
    strategies: StrategiesConfig = Field(default_factory=StrategiesConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    slm: TierConfig
    llm: TierConfig
    direct_slm: DirectSLMConfig | None = None

    @model_validator(mode="after")
    def _routes(self) -> "ServeConfig":
        if self.direct_slm is not None:
            if self.direct_slm.route_prefix == self.http.route_prefix:
                raise ValueError("direct_slm.route_prefix must differ from http.route_prefix")
            if self.direct_slm.app_name == self.name:
                raise ValueError("direct_slm.app_name must differ from name")
        return self


def load_serve_config(source: str | Path | dict, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Validate a serving config from a YAML file or a dict; ``overrides`` are dotted keys (``http.port``),
    string values parsed as YAML scalars."""
    return load_config_file(source, ServeConfig, overrides)
