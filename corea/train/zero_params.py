"""DeepSpeed configuration, ZeRO-3 loading, full parameters and Hugging Face exports under every ZeRO stage.

Under ZeRO-3 each parameter is partitioned over the data-parallel ranks and gathering it is a collective: every
function here that may gather is entered by ALL ranks, and they walk the parameters in module order, which is
the same on every rank, so the collectives line up. Under ZeRO 0-2 every rank holds the full weights and nothing
is gathered.

Precision (DeepSpeed 0.19.8, ``runtime/engine.py``): with bf16 the model holds bf16 weights, the ZeRO or BF16
optimizer keeps fp32 master weights, and ``data_types.grad_accum_dtype: "fp32"`` makes gradients accumulate over
micro-batches in fp32 (unset, they accumulate in the model dtype). DeepSpeed supports bf16 + fp32 accumulation
only with its ZeRO/BF16 optimizers (stage >= 1); stage 0 with bf16 is refused here rather than accumulated in bf16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from corea.train.checkpoints import write_hf_folder


def ds_config(
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    zero_stage: int,
    precision: str,
    max_grad_norm: float = 1.0,
) -> dict:
    """The DeepSpeed config dict of a policy or SFT rank.

    bf16: ``bf16.enabled`` and ``data_types.grad_accum_dtype = "fp32"`` (fp32 accumulation of bf16 gradients)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if precision == "bf16" and zero_stage == 0:
        raise ValueError("bf16 needs zero_stage >= 1: DeepSpeed accumulates bf16 gradients in fp32 only in its "
                         "ZeRO/BF16 optimizers (stage 0 would accumulate in bf16)")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def _synchronize(tensor: torch.Tensor) -> None:
    """Wait until queued kernels that may read ``tensor`` (e.g. an NCCL broadcast) have finished: the whole device,
    which covers the current stream and a communicator's own stream alike."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def iter_full_params(module: torch.nn.Module, zero3: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for every parameter of ``module``, one at a time, in module order.

    ZeRO-3: each parameter is gathered with ``deepspeed.zero.GatheredParameters`` (a collective: ALL ranks must
    iterate in lockstep and to the end) and re-partitioned when the generator advances, after the CUDA device
    has been synchronized, so a consumer's asynchronous read (a broadcast on any stream) has finished first. The
    tensor is only valid until the next item: clone it to keep it. Shared (tied) parameters come once."""
    if not zero3:
        last = None
        for name, param in module.named_parameters():
            last = param.data
            yield name, last
        if last is not None:
            _synchronize(last)
        return
    import deepspeed

    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            try:
                yield name, param.data
            finally:
                _synchronize(param.data)


def consolidated_state_dict(engine, rank: int) -> dict[str, torch.Tensor] | None:
    """The full state dict (weights in the training dtype: bf16 or fp32) on rank 0, ``None`` on the others.

    ZeRO-3: DeepSpeed's ``_zero3_consolidated_16bit_state_dict`` (collective, layer by layer, moved to CPU).
    ZeRO 0-2: the engine's ``module_state_dict`` on rank 0 (no collective)."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if rank == 0 else None
    if rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module_state_dict().items()}


def export_hf(engine, folder: str | Path, rank: int, tokenizer=None, extra_json: dict | None = None) -> Path | None:
    """All ranks call this; rank 0 writes the Hugging Face folder from the consolidated state dict (with
    ``extra_json``, see ``write_hf_folder``), the others write nothing. Returns the folder on rank 0, ``None``
    elsewhere; every rank returns after it is in place."""
    import deepspeed.comm as dist

    state = consolidated_state_dict(engine, rank)
    out = write_hf_folder(engine.module, state, folder, tokenizer, extra_json) if rank == 0 else None
    if dist.is_initialized():
        dist.barrier()
    return out
