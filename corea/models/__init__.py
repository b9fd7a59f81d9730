"""Model checkpoints: the tiny-model factory and the loading helpers every backend goes through."""

from corea.models.loading import load_model_and_tokenizer, load_tokenizer, resolve_device, resolve_dtype
from corea.models.tiny import SIZES, build_tokenizer, make_tiny_checkpoint

__all__ = [
    "SIZES",
    "build_tokenizer",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "make_tiny_checkpoint",
    "resolve_device",
    "resolve_dtype",
]
