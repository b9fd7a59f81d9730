"""Generation throughput: the transformers engine (HFEngine), plain ``model.generate`` and vLLM's CPU build.

Method: the same checkpoint (a tiny Qwen2 built on the spot, the ``llm`` size unless --size or --checkpoint says
otherwise), the same chat-rendered COREA prompts, the same sampling (temperature 1, top-p 1, no top-k, n samples
per prompt, max_tokens new tokens, unseeded unless --seed) for every method, in one process and one run. (vLLM
0.29.0's CPU build dies on a seeded request whose prefill is split over steps, as 64 x 4 prompts are with its
default token budget per step: it rewinds the request's generator, which a CPU generator cannot do.)
- transformers backend: *corea* takes all prompts in one ``HFEngine.generate`` call (batched, left-padded, each
  prompt prefilled once, finished samples dropped from the batch) and also returns per-token log-probabilities;
  the *baseline* calls ``model.generate(..., num_return_sequences=n)`` once per prompt in a loop, as a simple
  rollout script would (no log-probabilities); a batched ``model.generate`` over all prompts is a *reference*.
- vllm backend: our ``VLLMEngine`` (``load_engine(path, "vllm", dtype="float32", ...)``: an offline ``vllm.LLM``;
  on vLLM's CPU build a KV-cache byte budget and eager mode) takes all prompts in one ``generate`` call, as
  rollouts do, also returning the sampled tokens' log-probabilities. Its engine start-up (``load_engine`` until the
  engine is ready) is timed and printed on its own, never counted in throughput. Without vLLM installed (or
  when its engine cannot start) vLLM is reported as unavailable, with the reason, and the rest still runs.
Throughput = generated tokens (up to and including EOS) / wall-clock seconds of the call. Each method runs once
on two prompts as a warm-up, then --repeats times, interleaved (one run of every method per round), and the
median is reported. Threads: vLLM's CPU worker runs the model on one OpenMP thread per core it binds, all cores
but one (one is left to its scheduler process); the transformers methods get as many torch threads (--threads).
On a shared machine an OpenMP team larger than the cores it gets slows down several-fold, so the counts must match.
vLLM's engine core is a separate process that idles while the other methods run; the 1-minute load average is
recorded at the start and the end, since the machine may be shared.

    python bench/generation.py [--backends transformers vllm] [--size llm] [--prompts 64] [--n 4]
        [--max-tokens 128] [--repeats 3] [--threads N] [--skip loop reference] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ENGINE = "corea HFEngine.generate (all prompts, one call)"
LOOP = "baseline model.generate per prompt (loop)"
BATCHED = "reference model.generate batched (all prompts)"
VLLM = "vLLM CPU build, VLLMEngine.generate (one call)"


def count_generated(sequences: torch.Tensor, prompt_len: int, eos_ids: set[int]) -> int:
    """Generated tokens per row, up to and including the first EOS (the rest is padding)."""
    total = 0
    for row in sequences[:, prompt_len:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        total += end
    return total


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def start_vllm(path: str, max_model_len: int, kv_cache_bytes: int | None):
    """``(engine, start-up seconds, None)``, or ``(None, None, reason)`` when vLLM is not installed or its engine
    cannot start here."""
    if importlib.util.find_spec("vllm") is None:
        return None, None, "vllm is not installed in this environment"
    from corea.engines import load_engine

    options = {"dtype": "float32", "max_model_len": max_model_len, "seed": 0}
    if kv_cache_bytes:
        options["kv_cache_bytes"] = kv_cache_bytes
    start = time.perf_counter()
    try:
        engine = load_engine(path, "vllm", **options)
    except Exception as exc:  # noqa: BLE001 - any failure to start means "unavailable", reported with the reason
        return None, None, f"the vLLM engine did not start: {type(exc).__name__}: {str(exc)[:300]}"
    return engine, time.perf_counter() - start, None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["transformers", "vllm"], choices=["transformers", "vllm"])
    parser.add_argument("--size", default="llm", choices=["slm", "llm"])
    parser.add_argument("--checkpoint", help="an existing model folder instead of a tiny one")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=256, help="HFEngine sequences per batch")
    parser.add_argument("--max-model-len", type=int, default=1024, help="vLLM's context length")
    parser.add_argument("--kv-cache-bytes", type=int, help="vLLM's KV-cache budget (default: the engine's, 256 MiB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, help="request seed (default: none; see the method)")
    parser.add_argument("--skip", nargs="+", default=[], choices=["loop", "reference"],
                        help="leave out the per-prompt model.generate baseline and/or the batched reference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch threads of this process (default: all cores but one, as vLLM's worker binds)")
    parser.add_argument("--json", help="write the figures to this path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from corea.engines import SamplingParams
    from corea.engines.hf import HFEngine
    from corea.models import make_tiny_checkpoint
    from corea.protocol import chat_messages

    load_start = load_average()
    tmp = tempfile.TemporaryDirectory()
    path = str(args.checkpoint or make_tiny_checkpoint(Path(tmp.name) / args.size, args.size, seed=0))
    engine = HFEngine(path, device=args.device, max_batch_size=args.max_batch_size)  # also renders the prompts
    model, tokenizer = engine.model, engine.tokenizer
    prompts = [chat_messages(f"What is {i} + {2 * i + 1}? Show the steps.") for i in range(args.prompts)]
    rendered = [engine.render(p) for p in prompts]
    params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, seed=args.seed)
    eos = set(engine.eos_token_ids)
    hf_kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_tokens,
                     num_return_sequences=args.n, pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos))

    def run_engine(items, gen_engine=engine):
        gens = gen_engine.generate(items, params)
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

    methods: dict = {}
    if "transformers" in args.backends:
        methods[ENGINE] = (run_engine, prompts)
        if "loop" not in args.skip:
            methods[LOOP] = (run_loop, rendered)
        if "reference" not in args.skip:
            methods[BATCHED] = (run_batched, rendered)
    vllm_engine, vllm_startup, vllm_reason = None, None, None
    if "vllm" in args.backends:
        vllm_engine, vllm_startup, vllm_reason = start_vllm(path, args.max_model_len, args.kv_cache_bytes)
        if vllm_engine is not None:
            methods[VLLM] = (lambda items: run_engine(items, vllm_engine), prompts)

    rates: dict[str, list[float]] = {name: [] for name in methods}
    tokens: dict[str, int] = {}
    try:
        for repeat in range(-1, args.repeats):  # round -1: the warm-up, on two prompts
            for name, (fn, items) in list(methods.items()):
                start = time.perf_counter()
                try:
                    count = fn(items if repeat >= 0 else items[:2])
                except Exception as exc:  # noqa: BLE001 - vLLM's engine died: report it, keep the other figures
                    if name != VLLM:
                        raise
                    vllm_reason = f"its engine failed during the run: {type(exc).__name__}: {str(exc)[:300]}"
                    del methods[name], rates[name]
                    continue
                if repeat < 0:
                    continue
                tokens[name] = count
                seconds = time.perf_counter() - start
                rates[name].append(tokens[name] / seconds)
                print(f"[round {repeat + 1}] {name}: {tokens[name]} tokens in {seconds:.1f} s (load average "
                      f"{load_average()})", file=sys.stderr, flush=True)
    finally:
        if vllm_engine is not None:
            vllm_engine.shutdown()
    load_end = load_average()

    print(__doc__.split("\n\n    python")[0])
    print(f"\nmodel: {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{model.dtype}, {engine.device}, {torch.get_num_threads()} torch threads in this process)")
    print(f"workload: {args.prompts} prompts x n={args.n}, max_tokens={args.max_tokens}, "
          f"prompt length ~{len(engine.encode(prompts[0]))} tokens, repeats={args.repeats}")
    print(f"load average (1 min): {load_start} at the start, {load_end} at the end, {os.cpu_count()} cores")
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name in methods:
        runs = ", ".join(f"{r:.0f}" for r in rates[name])
        print(f"  {name:50s} {median[name]:9.0f} tok/s  ({tokens[name]} tokens; runs: {runs})")
    result: dict = {"prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens, "size": args.size,
                    "repeats": args.repeats, "threads": torch.get_num_threads(), "device": engine.device,
                    "load_average_start": load_start, "load_average_end": load_end,
                    "tok_s": {name: round(v, 1) for name, v in median.items()}, "tokens": tokens,
                    "runs_tok_s": {name: [round(r, 1) for r in v] for name, v in rates.items()}}
    if ENGINE in median:
        result["corea_tok_s"] = round(median[ENGINE], 1)
    if BATCHED in median:
        result["hf_batched_tok_s"] = round(median[BATCHED], 1)
    if LOOP in median:
        result["baseline_tok_s"] = round(median[LOOP], 1)
        result["ratio"] = round(median[ENGINE] / median[LOOP], 2)
        print(f"ratio corea HFEngine / baseline loop: {result['ratio']:.2f}x")
    if "vllm" in args.backends:
        result["vllm_available"] = VLLM in median
        if VLLM not in median:
            result["vllm_unavailable"] = vllm_reason
            print(f"vLLM: unavailable ({vllm_reason})")
        else:
            import vllm

            result.update(vllm_version=vllm.__version__, vllm_tok_s=round(median[VLLM], 1),
                          vllm_startup_s=round(vllm_startup, 1))
            print(f"vLLM {vllm.__version__}: engine start-up {vllm_startup:.1f} s (not counted in throughput)")
            if ENGINE in median:
                result["vllm_over_corea"] = round(median[VLLM] / median[ENGINE], 2)
                print(f"ratio vLLM / corea HFEngine: {result['vllm_over_corea']:.2f}x")
            if BATCHED in median:
                result["vllm_over_hf_batched"] = round(median[VLLM] / median[BATCHED], 2)
                print(f"ratio vLLM / batched model.generate: {result['vllm_over_hf_batched']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    tmp.cleanup()
    return result


if __name__ == "__main__":  # vLLM's engine core is a spawned process: start engines only from here
    main()
