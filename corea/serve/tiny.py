"""Tier checkpoints for serving, including a tiny SLM that states a confidence.

A tiny random checkpoint never writes ``\\confidence{}``, so every query would defer. ``tiny:slm-confident``
is the tiny SLM fine-tuned for a few seconds (plain torch, full batch, seeded) to answer arithmetic questions
("What is 1 + 2?") with ``\\boxed{2} \\confidence{0.9}`` and proofs ("Prove that ...") with
``\\boxed{1} \\confidence{0.2}``; greedy decoding then reproduces these exactly on the training questions.
It makes the cascade's both paths observable on a CPU; the answers are not meant to be right.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from corea.protocol import INSTRUCTION

CONFIDENT_SPEC = "tiny:slm-confident"
CONFIDENT_QUESTIONS = tuple(f"What is {a} + {b}?" for a in range(1, 5) for b in range(1, 3))
UNSURE_QUESTIONS = tuple(f"Prove that there are infinitely many primes of the form {a}n + {b}."
                         for a in range(3, 7) for b in range(1, 3))
CONFIDENT_ANSWER = "\\boxed{2} \\confidence{0.9}"
UNSURE_ANSWER = "\\boxed{1} \\confidence{0.2}"


def confident_slm_path(work_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Where ``tiny:slm-confident`` lives under ``work_dir``."""
    return Path(work_dir) / "models" / f"tiny-slm-confident-seed{seed}"


def resolve_tier_model(spec: str, work_dir: str | os.PathLike, seed: int = 0) -> str:
    """A checkpoint folder for ``spec``: ``tiny:slm-confident`` and ``tiny:<size>`` are built on the spot
    under ``work_dir/models``; anything else is returned as given."""
    if spec == CONFIDENT_SPEC:
        return str(make_confident_slm(confident_slm_path(work_dir, seed), seed=seed))
    from corea.train.loop import resolve_model

    return resolve_model(spec, Path(work_dir), seed)


def _examples(tokenizer):
    """(prompt ids, response ids) for every training question, prompts rendered as the serving path does."""
    pairs = [(q, CONFIDENT_ANSWER) for q in CONFIDENT_QUESTIONS] + [(q, UNSURE_ANSWER) for q in UNSURE_QUESTIONS]
    out = []
    for question, answer in pairs:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"{question}\n{INSTRUCTION}"}],
                                               tokenize=False, add_generation_prompt=True)
        out.append((tokenizer(prompt, add_special_tokens=False)["input_ids"],
                    tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]))
    return out


def make_confident_slm(path: str | os.PathLike, seed: int = 0, steps: int = 40, lr: float = 1e-2) -> Path:
    """Build (once) the fine-tuned tiny SLM at ``path``; the folder appears atomically."""
    import torch

    from corea.models import load_model_and_tokenizer, make_tiny_checkpoint

    path = Path(path)
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    threads = torch.get_num_threads()
    try:
        base = make_tiny_checkpoint(tmp / "base", "slm", seed=seed)
        model, tokenizer = load_model_and_tokenizer(base, dtype="float32", device="cpu")
        pairs = _examples(tokenizer)
        width = max(len(p) + len(r) for p, r in pairs)
        ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
        labels = torch.full((len(pairs), width), -100)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (prompt, response) in enumerate(pairs):
            seq = prompt + response
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, len(prompt) : len(seq)] = torch.tensor(response)
        torch.set_num_threads(1)  # small matrices: one thread is fastest and deterministic
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
            for _ in range(steps):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        out = tmp / "tuned"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        try:
            os.replace(out, path)
        except OSError:
            if not (path / "config.json").exists():  # not a concurrent builder of the same folder
                raise
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return path
