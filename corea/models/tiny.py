"""Tiny Qwen2 checkpoints built on the spot, loadable like any Hugging Face model folder.

A checkpoint folder holds ``config.json``, ``model.safetensors`` (random weights, seeded),
``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` (a byte-level BPE tokenizer trained
deterministically on a small built-in corpus, with a Qwen-style ChatML chat template). Every size shares one
tokenizer, so an SLM and an LLM made here speak the same vocabulary.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

from corea.protocol import INSTRUCTION

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
TOKENIZER_VOCAB_SIZE = 1024  # target; the trainer stops earlier if the corpus runs out of merges
_MARKER = "corea_tiny.json"
RECIPE = 2  # bumped whenever the same (size, seed) gives different weights; older folders are rebuilt

# Qwen2's pre-tokenizer split: contractions, words, single digits, punctuation runs, whitespace.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: Architecture of each size (Qwen2Config fields). Parameters: slm ~0.2 M, llm ~0.9 M (float32). Every size has
#: head_dim = hidden_size / num_attention_heads >= 32, the smallest head size vLLM's CPU attention backend takes
#: (it supports 32, 64, 80, 96, 112, 128, ...), so every engine runs every checkpoint.
SIZES: dict[str, dict[str, int]] = {
    "slm": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1),
    "llm": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2),
}
# Weights are wider than Qwen's 0.02 and the output head is scaled up so that random models have peaked
# next-token distributions (mean top-1 probability ~0.5, entropy ~2 nats): greedy decoding is then robust to the
# float rounding differences between batched and unbatched forward passes, and sampling still varies.
INITIALIZER_RANGE = 0.2
LM_HEAD_SCALE = 3.0
# The query and key projections start smaller: at std 0.2 an attention score q.k / sqrt(head_dim) over a
# unit-variance input has std ~ hidden_size * 0.2^2 (2.6 at hidden 64, 5.1 at 128), so the softmax starts saturated,
# its gradient vanishes and SFT barely moves attention (a 2-head SLM then learned 11 of 40 held-out taught sums,
# against 39 of 40 with this scale). At std 0.2 * 0.3 the scores start with std ~ hidden_size * 0.06^2 (0.23, 0.46).
QK_INIT_SCALE = 0.3


def _corpus() -> list[str]:
    """A fixed training corpus: the COREA instruction, maths, LaTeX, chat markup and common English."""
    words = (
        "the of and to a in is it you that he was for on are with as I his they be at one have this from or had "
        "by hot word but what some we can out other were all there when up use your how said an each she which "
        "do their time if will way about many then them write would like so these her long make thing see him "
        "two has look more day could go come did number sound no most people my over know water than call first "
        "who may down side been now find any new work part take get place made live where after back little only "
        "round man year came show every good me give our under name very through just form sentence great think "
        "say help low line differ turn cause much mean before move right boy old too same tell does set three "
        "want air well also play small end put home read hand port large spell add even land here must big high "
        "such follow act why ask men change went light kind off need house picture try us again animal point "
        "question answer choice choices reason step final confidence correct probability solve compute let find "
        "value therefore thus since because equation integer sum product total each per hence so answer is"
    ).split()
    latex = (
        r"\boxed{} \confidence{} \frac{1}{2} \sqrt{2} \cdot \times \div \pm \leq \geq \neq \pi \theta \alpha "
        r"\beta \infty \sum_{i=1}^{n} \int_0^1 x^2 \, dx \left( \right) \text{ } \mathbb{R} \log \sin \cos "
        r"\boxed{42} \confidence{0.9} \boxed{\frac{3}{4}} \confidence{0.75} \boxed{A} \confidence{0.5} $x$ $$"
    )
    lines = [INSTRUCTION] * 8 + [latex] * 4
    lines += [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)] * 3
    lines += [f"{a} + {b} = {a + b}. {a} * {b} = {a * b}. {a} - {b} = {a - b}." for a in range(13) for b in range(7)]
    lines += [f"The answer is \\boxed{{{n}}}, so \\confidence{{0.{n % 10}}}." for n in range(100)]
    lines += [
        f"Question: What is {a} + {b}? Answer Choices:\n(A) {a + b}\n(B) {a + b + 1}\n(C) {a * b}\n(D) {b}\n"
        f"{INSTRUCTION}\nLet's reason step by step. {a} + {b} = {a + b}. The final answer is \\boxed{{A}}.\n"
        f"\\confidence{{0.{(a * 7 + b) % 10}}}"
        for a in range(1, 10) for b in range(1, 5)
    ]
    lines += ["0123456789 .,;:!?()[]{}+-*/=<>^_%$#&|~'\"\\ \n\t"] * 4
    return lines


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """The trained tokenizer, serialized (training is deterministic; cached per process)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer():
    """The shared tiny tokenizer as a ``PreTrainedTokenizerFast`` (eos ``<|im_end|>``, pad ``<|endoftext|>``)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_model(size: str, seed: int, vocab_size: int, ids: dict[str, int]):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        max_position_embeddings=32768,
        initializer_range=INITIALIZER_RANGE,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        **SIZES[size],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(QK_INIT_SCALE)
            layer.self_attn.k_proj.weight.mul_(QK_INIT_SCALE)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[ENDOFTEXT], eos_token_id=[ids[IM_END], ids[ENDOFTEXT]], pad_token_id=ids[ENDOFTEXT]
    )
    return model


def _patch_configs(folder: Path) -> None:
    """Add the legacy keys older loaders (transformers 4.x, vLLM) read, and keep the template in the config."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("torch_dtype", cfg.get("dtype", "float32"))
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", 1_000_000.0))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_path.read_text())
    extra = tok_cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):  # transformers 4.x reads this key as a dict
        tok_cfg["additional_special_tokens"] = extra
    tok_cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE, padding_side="left")
    tok_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")


def make_tiny_checkpoint(path: str | os.PathLike, size: str = "slm", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny random Qwen2 checkpoint folder at ``path`` and return it.

    The same ``(size, seed)`` gives byte-identical weights. The folder appears atomically (built in a temporary
    sibling, then renamed). An existing folder made with the same size and seed is returned as is; any other
    existing folder raises ``FileExistsError`` unless ``overwrite``.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    path = Path(path)
    marker = {"size": size, "seed": int(seed), "recipe": RECIPE}
    if path.exists() and not overwrite:
        try:
            existing = json.loads((path / _MARKER).read_text())
        except (OSError, ValueError):
            existing = None
        if existing == marker:
            return path
        if not isinstance(existing, dict) or (existing.get("size"), existing.get("seed")) != (size, int(seed)):
            raise FileExistsError(f"{path} exists and is not a tiny checkpoint with {marker}; pass overwrite=True")
        # the same checkpoint from an earlier recipe: rebuilt below

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tokenizer = build_tokenizer()
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        model = _build_model(size, seed, len(tokenizer), ids)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _patch_configs(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker) + "\n")
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / _MARKER).exists():  # not a concurrent builder of the same folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
