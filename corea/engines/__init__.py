"""Generation backends behind one interface: transformers (everywhere) and vLLM (GPU, where installed)."""

from __future__ import annotations

from typing import Any

from corea.engines.base import ChatMessages, Engine, Generation, Prompt, Sample, SamplingParams

BACKENDS = ("transformers", "vllm")


def load_engine(model_path: str, backend: str = "transformers", **options: Any) -> Engine:
    """An engine for the checkpoint folder ``model_path``.

    ``backend="transformers"``: ``HFEngine`` (options: device, dtype, max_batch_size, seed).
    ``backend="vllm"``: ``VLLMEngine`` (options: tensor_parallel_size, dtype, gpu_memory_utilization, load_format,
    seed, enable_prefix_caching, async_engine, weight_transfer, ... any vLLM 0.29.0 engine argument).
    """
    if backend == "transformers":
        from corea.engines.hf import HFEngine

        return HFEngine(model_path, **options)
    if backend == "vllm":
        from corea.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **options)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


__all__ = ["BACKENDS", "ChatMessages", "Engine", "Generation", "Prompt", "Sample", "SamplingParams", "load_engine"]
