"""What one lent GPU machine can check with torch and this project alone (no Ray, no vLLM, no network).

Method: a tiny Qwen2 checkpoint built on the spot (or --model, a local folder), synthetic GRPO sequences
(random prompt and response ids, advantages +-1), one process, one DeepSpeed rank. Each check prints RAN with its
figures, SKIPPED with the reason, or FAILED with the error; each is set beside its obvious alternative:

1. policy-step   ``corea.train.policy.Policy`` on CUDA in bf16: --updates GRPO updates with ZeRO-2 and, beside
                 it, ZeRO-3 (model built under ``deepspeed.zero.Init``); s/update (median after a warm-up),
                 peak CUDA memory, the engine's (model, gradient-accumulation) dtypes, finite loss, weights moved.
2. reference     ``ReferenceModel`` log-probs in bf16 on CUDA against fp32 on the CPU: max and mean |delta log p|
                 over response tokens, ms per call on each.
3. engine        ``corea.engines.hf.HFEngine`` greedy generation on CUDA (bf16) against the CPU (fp32): tokens/s
                 on each, share of prompts whose greedy tokens agree.
4. zero3-export  ``Policy.export_hf`` under ZeRO-3 (single rank): the folder loads with ``from_pretrained`` and
                 equals ``named_full_params``; seconds to export.

Without CUDA the CUDA parts are skipped (with the reason) and checks 1 and 4 run in fp32 on the CPU as stand-ins,
labelled so, which exercises this script. Exit status 1 if any check failed.

    python bench/gpu_check.py [--model DIR] [--updates 3] [--sequences 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

RESULTS: list[dict] = []


def report(check: str, status: str, **figures) -> None:
    RESULTS.append({"check": check, "status": status, **figures})
    shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"[{status:7s}] {check:14s} {shown}", flush=True)


def run(check: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # a failed check is reported; the others still run
        traceback.print_exc()
        report(check, "FAILED", error=f"{type(exc).__name__}: {exc}"[:300])


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sequences(n: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    from corea.train.sequences import RolloutSequence

    rng = random.Random(seed)
    return [RolloutSequence([rng.randrange(3, vocab) for _ in range(prompt_len)],
                            [rng.randrange(3, vocab) for _ in range(response_len)],
                            advantage=1.0 if i % 2 else -1.0) for i in range(n)]


def _policy(model: str, stage: int, precision: str, seqs: int, micro: int, port: int):
    from corea.train.config import OptimConfig
    from corea.train.policy import Policy

    optim = OptimConfig(micro_batch_size=micro, lr=1e-5, kl_coef=0.0, entropy_coef=0.0, zero_stage=stage,
                        precision=precision)
    return Policy(model, optim, seqs, rank=0, world_size=1, master_port=port)


def check_policy_step(args, model: str, cuda: bool, port: int, vocab: int) -> None:
    precision, label = ("bf16", "policy-step") if cuda else ("fp32", "policy-step(cpu fp32 stand-in)")
    if not cuda:
        report("policy-step", "SKIPPED", why="no CUDA device: the bf16 DeepSpeed step on CUDA did not run")
    batch = sequences(args.sequences, args.prompt_len, args.response_len, vocab)
    for stage in (2, 3):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        policy = _policy(model, stage, precision, args.sequences, args.micro_batch, port)
        before = {n: t.detach().float().cpu().clone() for n, t in policy.named_full_params()}
        times, stats = [], {}
        for _ in range(args.updates + 1):  # the first is a warm-up
            _sync()
            t0 = time.perf_counter()
            stats = policy.train(batch, None)
            _sync()
            times.append(time.perf_counter() - t0)
        moved = sum(not torch.equal(before[n], t.detach().float().cpu()) for n, t in policy.named_full_params())
        dtypes = "/".join(str(d).removeprefix("torch.") for d in policy.engine.get_data_types())
        ok = moved > len(before) // 2 and all(math.isfinite(stats[k]) for k in ("loss", "policy_loss", "kl"))
        figures = dict(zero=stage, dtypes=dtypes, s_per_update=statistics.median(times[1:]), loss=stats["loss"],
                       params_moved=f"{moved}/{len(before)}")
        if cuda:
            figures["peak_cuda_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        report(label, "RAN" if ok else "FAILED", **figures)
        del policy


def check_reference(args, model: str, cuda: bool, vocab: int) -> None:
    if not cuda:
        report("reference", "SKIPPED", why="no CUDA device: bf16-on-CUDA against fp32-on-CPU needs both")
        return
    from corea.train.policy import ReferenceModel

    batch = sequences(args.sequences, args.prompt_len, args.response_len, vocab, seed=1)
    out, ms = {}, {}
    for device in ("cuda", "cpu"):
        ref = ReferenceModel(model, micro_batch_size=args.micro_batch, device=device)
        ref.logprobs(batch)  # warm-up
        _sync()
        t0 = time.perf_counter()
        out[device] = ref.logprobs(batch)
        _sync()
        ms[device] = 1000 * (time.perf_counter() - t0)
    gaps = [abs(a - b) for x, y in zip(out["cuda"], out["cpu"]) for a, b in zip(x, y)]
    report("reference", "RAN" if max(gaps) < 0.5 else "FAILED", max_abs_dlogp=max(gaps),
           mean_abs_dlogp=statistics.fmean(gaps), ms_cuda_bf16=ms["cuda"], ms_cpu_fp32=ms["cpu"])


def check_engine(args, model: str, cuda: bool) -> None:
    if not cuda:
        report("engine", "SKIPPED", why="no CUDA device: HFEngine on CUDA did not run")
        return
    from corea.engines import SamplingParams, load_engine

    prompts = [[{"role": "user", "content": f"What is {i} + {i + 1}?"}] for i in range(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    tokens, rate = {}, {}
    for device, dtype in (("cuda", "bfloat16"), ("cpu", "float32")):
        engine = load_engine(model, backend="transformers", device=device, dtype=dtype)
        engine.generate(prompts[:2], params)  # warm-up
        _sync()
        t0 = time.perf_counter()
        gens = engine.generate(prompts, params)
        _sync()
        tokens[device] = [g.samples[0].token_ids for g in gens]
        rate[device] = sum(map(len, tokens[device])) / (time.perf_counter() - t0)
    agree = statistics.fmean(a == b for a, b in zip(tokens["cuda"], tokens["cpu"]))
    report("engine", "RAN", tokens_per_s_cuda_bf16=rate["cuda"], tokens_per_s_cpu_fp32=rate["cpu"],
           greedy_agreement=agree)


def check_zero3_export(args, model: str, cuda: bool, port: int) -> None:
    from transformers import AutoModelForCausalLM

    precision, label = ("bf16", "zero3-export") if cuda else ("fp32", "zero3-export(cpu fp32)")
    policy = _policy(model, 3, precision, args.micro_batch, args.micro_batch, port)
    full = {n: t.detach().cpu().clone() for n, t in policy.named_full_params()}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = policy.export_hf(Path(tmp) / "hf")
        seconds = time.perf_counter() - t0
        loaded = dict(AutoModelForCausalLM.from_pretrained(folder, dtype=full[next(iter(full))].dtype)
                      .named_parameters())
        equal = set(loaded) == set(full) and all(torch.equal(loaded[n].detach(), full[n]) for n in full)
    report(label, "RAN" if equal else "FAILED", export_s=seconds, tensors=len(full), equal_to_gathered=equal)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a local Hugging Face folder (default: a tiny Qwen2 built here)")
    parser.add_argument("--size", default="llm", choices=["slm", "llm"], help="tiny model size")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--sequences", type=int, default=8, help="sequences per update")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16, help="engine prompts")
    parser.add_argument("--max-tokens", type=int, default=32, help="engine tokens per prompt")
    parser.add_argument("--json", help="write the results to this path")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        ds = deepspeed.__version__
    except Exception as exc:  # noqa: BLE001 (any import failure means: no DeepSpeed here)
        ds = None
        ds_why = f"{type(exc).__name__}: {exc}"[:200]
    import transformers

    device = torch.cuda.get_device_name(0) if cuda else "none"
    report("environment", "RAN", torch=torch.__version__, cuda=torch.version.cuda, device=device,
           transformers=transformers.__version__, deepspeed=ds, python=sys.version.split()[0])
    from corea.models import make_tiny_checkpoint
    from corea.models.loading import load_tokenizer

    tmp = tempfile.TemporaryDirectory()
    model = args.model or str(make_tiny_checkpoint(Path(tmp.name) / args.size, args.size, seed=0))
    vocab = len(load_tokenizer(model))
    port = _free_port()
    if ds is None:
        for check in ("policy-step", "zero3-export"):
            report(check, "SKIPPED", why=f"DeepSpeed not importable ({ds_why})")
    else:
        run("policy-step", check_policy_step, args, model, cuda, port, vocab)
    run("reference", check_reference, args, model, cuda, vocab)
    run("engine", check_engine, args, model, cuda)
    if ds is not None:
        run("zero3-export", check_zero3_export, args, model, cuda, port)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2))
    failed = [r["check"] for r in RESULTS if r["status"] == "FAILED"]
    print(f"summary: {sum(r['status'] == 'RAN' for r in RESULTS)} ran, "
          f"{sum(r['status'] == 'SKIPPED' for r in RESULTS)} skipped, {len(failed)} failed {failed or ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
