"""Loading a causal LM and its tokenizer: tiny checkpoints and real ones alike, from a local folder, a URI or a
Hugging Face Hub id (``resolve_model_path``: each node fetches once into its cache)."""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.ot")
NOT_NEEDED = ("original/*", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.ot")  # other formats' weights


def resolve_model_path(spec: str | os.PathLike, weights: bool = True) -> str:
    """A local folder for a model named by a local path (as is), a URI (``s3://bucket/Qwen2.5-7B-Instruct``, a
    checkpoint's ``.../step_000150/hf``: copied once per node, see ``corea.storage.local_copy``) or a Hugging Face
    Hub id (``Qwen/Qwen2.5-7B-Instruct``: downloaded once per node into the Hub cache, ``HF_HOME``).
    ``weights=False``: config and tokenizer files only."""
    spec = os.fspath(spec)
    if spec.startswith("file://"):
        return spec[len("file://"):]
    from corea import storage

    if storage.is_uri(spec):
        return str(storage.local_copy(spec, skip=() if weights else WEIGHTS))
    if os.path.exists(os.path.expanduser(spec)) or not HUB_ID.fullmatch(spec):
        return spec
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec, ignore_patterns=list(NOT_NEEDED if weights else WEIGHTS + NOT_NEEDED))
    except Exception as exc:  # not found, offline, gated: say that a local folder was looked for too
        raise FileNotFoundError(f"{spec}: no such local folder, and not available from the Hugging Face Hub "
                                f"({type(exc).__name__}: {exc})") from exc


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

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path, weights=False), **kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_zero3(deepspeed_config: dict | None) -> bool:
    """True when a DeepSpeed config dict asks for ZeRO stage 3 (partitioned parameters)."""
    return bool(deepspeed_config) and int(deepspeed_config.get("zero_optimization", {}).get("stage", 0)) == 3


@contextmanager
def zero3_loading(deepspeed_config: dict | None):
    """While open, ``from_pretrained`` builds the model under ``deepspeed.zero.Init`` when the config is ZeRO-3:
    each parameter is partitioned as it is created, rank 0 reads the checkpoint and the layers are scattered one
    at a time, so no rank holds the full model (transformers' ``HfDeepSpeedConfig``, kept alive for the load;
    it needs ``accelerate``). Transformers' global is restored on exit, so later loads in the process are plain.
    A collective under ZeRO-3: all ranks load together, ``torch.distributed`` initialised. No-op otherwise."""
    if not is_zero3(deepspeed_config):
        yield None
        return
    import transformers.integrations.deepspeed as hf_ds

    previous = hf_ds._hf_deepspeed_config_weak_ref
    keep = hf_ds.HfDeepSpeedConfig(deepspeed_config)  # transformers holds only a weak reference to it
    try:
        yield keep
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = previous
        del keep


def load_model_and_tokenizer(
    path: str | os.PathLike,
    dtype: str = "auto",
    device: str | None = None,
    deepspeed_config: dict | None = None,
    **model_kwargs: Any,
):
    """``(model, tokenizer)`` from a Hugging Face folder (local, a URI or a Hub id: ``resolve_model_path``), model
    in eval mode on ``device``.

    ``dtype``: "auto" | "float32" | "bfloat16" | "float16" (see ``resolve_dtype``); ``device``: None/"auto",
    "cpu", "cuda", "cuda:1", ... ``deepspeed_config``: the DeepSpeed config the model will be trained with; under
    ZeRO-3 the model is built partitioned (``zero3_loading``) and left where ``deepspeed.zero.Init`` put it
    (``device`` is not applied). Extra keyword arguments go to ``AutoModelForCausalLM.from_pretrained``
    (e.g. ``attn_implementation``).
    """
    import transformers
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    path = resolve_model_path(path)
    torch_dtype = resolve_dtype(path, dtype, device)
    major = int(transformers.__version__.split(".")[0])
    dtype_key = "dtype" if major >= 5 else "torch_dtype"
    with zero3_loading(deepspeed_config):
        model = AutoModelForCausalLM.from_pretrained(str(path), **{dtype_key: torch_dtype}, **model_kwargs)
    if not is_zero3(deepspeed_config):
        model.to(device)
    model.eval()
    return model, load_tokenizer(path)
