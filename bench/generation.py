"""Generation throughput: the transformers engine (HFEngine) against plain ``model.generate`` per prompt.

Method: the same checkpoint (a tiny Qwen2 built on the spot unless --checkpoint is given), the same chat-rendered
COREA prompts, the same sampling (temperature 1, top-p 1, no top-k, n samples per prompt, max_tokens new tokens).
The baseline calls ``model.generate(..., num_return_sequences=n)`` once per prompt in a loop, as a simple
rollout script would; the engine takes all prompts in one ``generate`` call (batched, left-padded, each prompt
prefilled once, finished samples dropped from the batch) and also returns per-token log-probabilities, which
the baseline does not compute. A batched ``model.generate`` over all prompts is printed as a reference.
Throughput = generated tokens (up to and including EOS) / wall-clock seconds; each method runs --repeats times,
interleaved, after one warm-up call, and the median is reported.

    python bench/generation.py [--size slm] [--prompts 64] [--n 4] [--max-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def count_generated(sequences: torch.Tensor, prompt_len: int, eos_ids: set[int]) -> int:
    """Generated tokens per row, up to and including the first EOS (the rest is padding)."""
    total = 0
    for row in sequences[:, prompt_len:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        total += end
    return total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="slm", choices=["slm", "llm"])
    parser.add_argument("--checkpoint", help="an existing model folder instead of a tiny one")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=256, help="engine sequences per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="write the figures to this path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from corea.engines import SamplingParams
    from corea.engines.hf import HFEngine
    from corea.models import make_tiny_checkpoint
    from corea.protocol import chat_messages

    tmp = tempfile.TemporaryDirectory()
    path = args.checkpoint or make_tiny_checkpoint(Path(tmp.name) / args.size, args.size, seed=0)
    engine = HFEngine(path, device=args.device, max_batch_size=args.max_batch_size)
    model, tokenizer = engine.model, engine.tokenizer
    prompts = [chat_messages(f"What is {i} + {2 * i + 1}? Show the steps.") for i in range(args.prompts)]
    rendered = [engine.render(p) for p in prompts]
    params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, seed=0)
    eos = set(engine.eos_token_ids)
    hf_kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_tokens,
                     num_return_sequences=args.n, pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos))

    def run_engine(items):
        gens = engine.generate(items, params)
        return sum(s.output_tokens for g in gens for s in g.samples)

    @torch.inference_mode()
    def run_loop(texts):
        total = 0
        for text in texts:
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(engine.device)
            out = model.generate(**enc, **hf_kwargs)
            total += count_generated(out, enc["input_ids"].shape[1], eos)
        return total

    @torch.inference_mode()
    def run_batched(texts):
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(engine.device)
        out = model.generate(**enc, **hf_kwargs)
        return count_generated(out, enc["input_ids"].shape[1], eos)

    methods = {
        "corea HFEngine.generate (all prompts, one call)": (run_engine, prompts),
        "baseline model.generate per prompt (loop)": (run_loop, rendered),
        "reference model.generate batched (all prompts)": (run_batched, rendered),
    }
    for fn, items in methods.values():  # warm-up
        fn(items[:2])
    rates: dict[str, list[float]] = {name: [] for name in methods}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, (fn, items) in methods.items():
            start = time.perf_counter()
            tokens[name] = fn(items)
            rates[name].append(tokens[name] / (time.perf_counter() - start))

    print(__doc__.split("\n\n    python")[0])
    print(f"\nmodel: {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{model.dtype}, {engine.device}, {torch.get_num_threads()} threads)")
    print(f"workload: {args.prompts} prompts x n={args.n}, max_tokens={args.max_tokens}, "
          f"prompt length ~{len(engine.encode(prompts[0]))} tokens, repeats={args.repeats}")
    for name in methods:
        runs = ", ".join(f"{r:.0f}" for r in rates[name])
        print(f"  {name:50s} {statistics.median(rates[name]):9.0f} tok/s  ({tokens[name]} tokens; runs: {runs})")
    corea = statistics.median(rates["corea HFEngine.generate (all prompts, one call)"])
    baseline = statistics.median(rates["baseline model.generate per prompt (loop)"])
    batched = statistics.median(rates["reference model.generate batched (all prompts)"])
    result = {
        "corea_tok_s": round(corea, 1),
        "baseline_tok_s": round(baseline, 1),
        "ratio": round(corea / baseline, 2),
        "hf_batched_tok_s": round(batched, 1),
        "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens, "size": args.size,
        "threads": torch.get_num_threads(), "device": engine.device,
    }
    print(f"ratio corea / baseline: {result['ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
