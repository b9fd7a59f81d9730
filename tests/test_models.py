"""Tiny checkpoints: real Hugging Face folders, deterministic, with a ChatML template and a byte-level BPE."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from corea.models import SIZES, load_model_and_tokenizer, make_tiny_checkpoint
from corea.models.loading import resolve_dtype
from corea.protocol import INSTRUCTION, chat_messages

FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.mark.parametrize("size", ["slm", "llm"])
def test_round_trip_through_from_pretrained(tiny_checkpoints, size):
    path = tiny_checkpoints[size]
    assert FILES <= set(os.listdir(path))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, Qwen2ForCausalLM)
    assert model.config.hidden_size == SIZES[size]["hidden_size"]
    assert model.config.num_hidden_layers == SIZES[size]["num_hidden_layers"]
    assert model.config.vocab_size == len(tokenizer)
    assert 256 < len(tokenizer) <= 2048
    saved = load_file(str(path / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    ids = torch.tensor([tokenizer("1 + 1 = 2")["input_ids"]])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_llm_is_bigger_than_slm(tiny_checkpoints):
    count = lambda p: sum(t.numel() for t in load_file(str(p / "model.safetensors")).values())  # noqa: E731
    assert count(tiny_checkpoints["llm"]) > 2 * count(tiny_checkpoints["slm"])


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_size_has_a_head_dim_vllm_cpu_runs(size):
    # vLLM's CPU attention backend takes head sizes 32, 64, 80, ...; 16 kills the engine at its first generate
    arch = SIZES[size]
    head_dim = arch["hidden_size"] // arch["num_attention_heads"]
    assert head_dim * arch["num_attention_heads"] == arch["hidden_size"] and head_dim >= 32 and head_dim % 16 == 0
    assert arch["num_attention_heads"] % arch["num_key_value_heads"] == 0


def test_special_tokens_and_generation_config(tiny_checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["slm"])
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
    gen = json.loads((tiny_checkpoints["slm"] / "generation_config.json").read_text())
    assert tokenizer.eos_token_id in gen["eos_token_id"] and gen["pad_token_id"] == tokenizer.pad_token_id


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_checkpoints):
    again = make_tiny_checkpoint(tmp_path / "again", "slm", seed=0)
    for name in FILES:
        assert (again / name).read_bytes() == (tiny_checkpoints["slm"] / name).read_bytes(), name
    a = load_file(str(tiny_checkpoints["slm"] / "model.safetensors"))
    b = load_file(str(tiny_checkpoints["slm_b"] / "model.safetensors"))
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    # the tokenizer is shared by every size and seed
    assert (tiny_checkpoints["llm"] / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_existing_folder_rules(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m", "slm", seed=3)
    assert make_tiny_checkpoint(path, "slm", seed=3) == path  # idempotent
    with pytest.raises(FileExistsError):
        make_tiny_checkpoint(path, "slm", seed=4)
    make_tiny_checkpoint(path, "llm", seed=4, overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers == SIZES["llm"]["num_hidden_layers"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind
    with pytest.raises(ValueError):
        make_tiny_checkpoint(tmp_path / "x", "huge")


def test_a_folder_from_an_earlier_recipe_is_rebuilt(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m", "slm", seed=3)
    fresh = (path / "model.safetensors").read_bytes()
    (path / "corea_tiny.json").write_text(json.dumps({"size": "slm", "seed": 3}))  # as written before recipes
    (path / "model.safetensors").write_bytes(b"old weights")
    assert make_tiny_checkpoint(path, "slm", seed=3) == path
    assert (path / "model.safetensors").read_bytes() == fresh
    (path / "corea_tiny.json").write_text(json.dumps({"size": "llm", "seed": 3}))  # another checkpoint: kept
    with pytest.raises(FileExistsError):
        make_tiny_checkpoint(path, "slm", seed=3)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_attention_starts_unsaturated(tiny_checkpoints, size):
    """At initialization the attention rows are far from one-hot (a saturated softmax passes almost no gradient)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[size], attn_implementation="eager")
    ids = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    top = torch.stack([a[..., 16:, :].max(dim=-1).values.mean() for a in attentions])  # rows with >= 17 keys
    assert float(top.max()) < 0.25, top  # uniform rows: ~0.03; at the untempered init: 0.43-0.71


def test_chat_template_renders_the_corea_prompt(tiny_checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["slm"])
    messages = chat_messages("What is 2 + 3?", ["4", "5"])
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and INSTRUCTION in text
    assert "(B) 5" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")
    custom = [{"role": "system", "content": "Be brief."}] + messages
    rendered = tokenizer.apply_chat_template(custom, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    # the chat markers are single special tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tokenizer.eos_token_id) == 2


@pytest.mark.parametrize(
    "text",
    [
        INSTRUCTION,
        "\\boxed{\\frac{3}{4}} \\confidence{0.85}",
        "12345 + 67890 = 80235\n\n\ttabs  and  spaces ",
        "héllo wörld, naïve café — 日本語のテキスト 🙂 Привет",
        "",
    ],
)
def test_tokenizer_round_trip(tiny_checkpoints, text):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["slm"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_digits_are_single_tokens(tiny_checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["slm"])
    assert len(tokenizer("2024", add_special_tokens=False)["input_ids"]) == 4


def test_loader_helper(tiny_checkpoints):
    model, tokenizer = load_model_and_tokenizer(tiny_checkpoints["slm"], dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    model, _ = load_model_and_tokenizer(tiny_checkpoints["slm"])
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert resolve_dtype(tiny_checkpoints["slm"], "auto", "cuda") == torch.float32  # the stored dtype
    with pytest.raises(ValueError):
        load_model_and_tokenizer(tiny_checkpoints["slm"], dtype="int3")
    with pytest.raises(ValueError):
        load_model_and_tokenizer(tiny_checkpoints["slm"], device="tpu")
