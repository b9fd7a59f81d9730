"""Loading a causal LM and its tokenizer from a local folder: tiny checkpoints and real ones alike."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str | None = None) -> str:
    """``None``/``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else as given."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"unknown device {device!r}")
    return device


def resolve_dtype(path: str | os.PathLike, dtype: str = "auto", device: str = "cpu"):
    """The torch dtype to load with.

    ``"auto"``: the checkpoint's stored dtype on an accelerator; float32 on CPU (half-precision matmuls are slow
    or unsupported on most CPUs, and tiny checkpoints are stored in float32 anyway).
    """
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cpu"):
        return torch.float32
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
        stored = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    except (OSError, ValueError):
        stored = "bfloat16"
    return getattr(torch, stored, torch.bfloat16)


def load_tokenizer(path: str | os.PathLike, **kwargs: Any):
    """``AutoTokenizer`` with left padding (for batched generation) and a pad token (falls back to EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    path: str | os.PathLike, dtype: str = "auto", device: str | None = None, **model_kwargs: Any
):
    """``(model, tokenizer)`` from a local Hugging Face folder, model in eval mode on ``device``.

    ``dtype``: "auto" | "float32" | "bfloat16" | "float16" (see ``resolve_dtype``); ``device``: None/"auto",
    "cpu", "cuda", "cuda:1", ... Extra keyword arguments go to ``AutoModelForCausalLM.from_pretrained``
    (e.g. ``attn_implementation``).
    """
    import transformers
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(path, dtype, device)
    major = int(transformers.__version__.split(".")[0])
    dtype_key = "dtype" if major >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(str(path), **{dtype_key: torch_dtype}, **model_kwargs)
    model.to(device).eval()
    return model, load_tokenizer(path)
