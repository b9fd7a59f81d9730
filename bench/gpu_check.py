"""What one lent GPU machine can check with torch and this project alone (no Ray, no vLLM, no network).

Runs with torch alone: what needs more (transformers, DeepSpeed, this package) is SKIPPED with the reason.

Method: a tiny Qwen2 checkpoint built on the spot (or --model, a local folder), synthetic GRPO sequences
(random prompt and response ids, advantages +-1), one process, one DeepSpeed rank. Each check prints RAN with its
figures, SKIPPED with the reason, or FAILED with the error; each is set beside its obvious alternative:

0. nccl          torch's NCCL version; on CUDA, a one-rank NCCL communicator started in a subprocess with
                 NCCL_DEBUG=INFO: the network NCCL chose and whether it loaded the EFA plugin (aws-ofi-nccl,
                 libnccl-net*.so on LD_LIBRARY_PATH or under /opt/amazon/ofi-nccl). FAILED when the plugin is
                 there and NCCL did not load it (it would fall back to TCP sockets between nodes).
1. policy-step   ``corea.train.policy.Policy`` on CUDA in bf16: --updates GRPO updates with ZeRO-2 and, beside
                 it, ZeRO-3 (model built under ``deepspeed.zero.Init``); s/update (median after a warm-up),
                 peak CUDA memory, the engine's (model, gradient-accumulation) dtypes, finite loss, weights moved.
2. reference     ``ReferenceModel`` log-probs in bf16 on CUDA against fp32 on the CPU: max and mean |delta log p|
                 over response tokens, ms per call on each.
3. engine        ``corea.engines.hf.HFEngine`` greedy generation on CUDA (bf16) against the CPU (fp32): tokens/s
                 on each, share of prompts whose greedy tokens agree. FAILED when a prompt gets no tokens, a token
                 is outside the vocabulary, or greedy decoding on CUDA differs between two identical runs.
4. zero3-export  ``Policy.export_hf`` under ZeRO-3 (single rank): the folder loads with ``from_pretrained`` and
                 equals ``named_full_params``; seconds to export.

Without CUDA the CUDA parts are skipped (with the reason) and checks 1 and 4 run in fp32 on the CPU as stand-ins,
labelled so, which exercises this script. Exit status 1 if any check failed.

    python bench/gpu_check.py [--model DIR] [--updates 3] [--sequences 8] [--json out.json] [--nccl-only]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import re
import subprocess
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


EFA_PLUGIN_DIRS = ("/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu", "/opt/amazon/ofi-nccl/lib", "/opt/aws-ofi-nccl/lib")
NCCL_PROBE = """
import os, torch, torch.distributed as dist
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:" + os.environ["PROBE_PORT"], rank=0, world_size=1)
x = torch.ones(1, device="cuda")
dist.all_reduce(x)
torch.cuda.synchronize()
print("probe-sum", x.item())
dist.destroy_process_group()
"""


def efa_plugin_files() -> list[str]:
    """NCCL network plugins (libnccl-net*.so) on LD_LIBRARY_PATH or in aws-ofi-nccl's install folders."""
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d] + list(EFA_PLUGIN_DIRS)
    return sorted({f for d in dirs for f in glob.glob(os.path.join(d, "libnccl-net*.so"))})


def parse_nccl_log(text: str) -> dict:
    """What NCCL's INFO log says about its network: the one it uses, and whether the OFI (EFA) plugin loaded."""
    used = re.findall(r"NCCL INFO Using network (\S+)", text)
    return {"network": used[-1] if used else None,
            "ofi_plugin_loaded": bool(re.search(r"NET/OFI|Libfabric|aws-ofi-nccl", text))}


def check_nccl(args, cuda: bool) -> None:
    version = None
    try:
        v = torch.cuda.nccl.version()
        version = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as exc:  # noqa: BLE001 (a torch without NCCL)
        report("nccl", "SKIPPED", why=f"torch has no NCCL ({type(exc).__name__}: {exc})"[:200])
        return
    plugins = efa_plugin_files()
    if not cuda:
        report("nccl", "SKIPPED", nccl=version, efa_plugins=len(plugins),
               why="no CUDA device: no NCCL communicator can start")
        return
    env = {**os.environ, "NCCL_DEBUG": "INFO", "PROBE_PORT": str(_free_port())}
    env["LD_LIBRARY_PATH"] = ":".join([*EFA_PLUGIN_DIRS, os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    done = subprocess.run([sys.executable, "-c", NCCL_PROBE], env=env, capture_output=True, text=True,
                          timeout=args.nccl_timeout)
    log = done.stdout + done.stderr
    seen = parse_nccl_log(log)
    ok = done.returncode == 0 and "probe-sum 1.0" in log and (seen["ofi_plugin_loaded"] or not plugins)
    report("nccl", "RAN" if ok else "FAILED", nccl=version, network=seen["network"],
           efa_plugin_present=bool(plugins), efa_plugin_loaded=seen["ofi_plugin_loaded"],
           fi_provider=os.environ.get("FI_PROVIDER"), **({} if done.returncode == 0 else {"error": log[-300:]}))
    if plugins and not seen["ofi_plugin_loaded"]:
        print("NCCL did not load the EFA plugin found at " + ", ".join(plugins) + "; NCCL's network lines:\n"
              + "\n".join(line for line in log.splitlines() if "NET" in line or "network" in line)[-2000:])


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
    tokens, rate, again, vocab = {}, {}, None, None
    for device, dtype in (("cuda", "bfloat16"), ("cpu", "float32")):
        engine = load_engine(model, backend="transformers", device=device, dtype=dtype)
        vocab = len(engine.tokenizer) if hasattr(engine, "tokenizer") else None
        engine.generate(prompts[:2], params)  # warm-up
        _sync()
        t0 = time.perf_counter()
        gens = engine.generate(prompts, params)
        _sync()
        tokens[device] = [list(g.samples[0].token_ids) for g in gens]
        rate[device] = sum(map(len, tokens[device])) / (time.perf_counter() - t0)
        if device == "cuda":
            again = [list(g.samples[0].token_ids) for g in engine.generate(prompts, params)]
    agree = statistics.fmean(a == b for a, b in zip(tokens["cuda"], tokens["cpu"]))
    problems = engine_problems(tokens, again, vocab)
    report("engine", "FAILED" if problems else "RAN", tokens_per_s_cuda_bf16=rate["cuda"],
           tokens_per_s_cpu_fp32=rate["cpu"], greedy_agreement=agree,
           **({"error": "; ".join(problems)} if problems else {}))


def engine_problems(tokens: dict[str, list[list[int]]], again: list[list[int]] | None, vocab: int | None) -> list[str]:
    """What makes the engine check fail: an empty answer, a token outside the vocabulary, or greedy decoding on
    CUDA that differs between two identical runs."""
    problems = []
    for device, runs in tokens.items():
        if any(not t for t in runs):
            problems.append(f"{device}: a prompt got no tokens")
        if vocab is not None and any(not 0 <= i < vocab for t in runs for i in t):
            problems.append(f"{device}: a token id outside the vocabulary ({vocab})")
    if again is not None and again != tokens.get("cuda"):
        problems.append("cuda: greedy decoding differs between two identical runs")
    return problems


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


def _optional(name: str):
    """(module, None) or (None, why it is not importable)."""
    try:
        return __import__(name), None
    except Exception as exc:  # noqa: BLE001 (any import failure means: not here)
        return None, f"{name} not importable ({type(exc).__name__}: {exc})"[:200]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument("--nccl-only", action="store_true", help="only the environment and the NCCL check")
    parser.add_argument("--nccl-timeout", type=float, default=120, help="seconds for the NCCL probe")
    parser.add_argument("--json", help="write the results to this path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    transformers, tf_why = _optional("transformers")
    deepspeed, ds_why = _optional("deepspeed") if transformers else (None, "not tried: transformers missing")
    device = torch.cuda.get_device_name(0) if cuda else "none"
    report("environment", "RAN", torch=torch.__version__, cuda=torch.version.cuda, device=device,
           transformers=getattr(transformers, "__version__", None), deepspeed=getattr(deepspeed, "__version__", None),
           python=sys.version.split()[0])
    run("nccl", check_nccl, args, cuda)
    if not args.nccl_only:
        model_checks(args, cuda, tf_why, ds_why)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2))
    failed = [r["check"] for r in RESULTS if r["status"] == "FAILED"]
    print(f"summary: {sum(r['status'] == 'RAN' for r in RESULTS)} ran, "
          f"{sum(r['status'] == 'SKIPPED' for r in RESULTS)} skipped, {len(failed)} failed {failed or ''}")
    return 1 if failed else 0


def model_checks(args, cuda: bool, tf_why: str | None, ds_why: str | None) -> None:
    """Checks 1-4: they need transformers (and this package); 1 and 4 also DeepSpeed."""
    names = ("policy-step", "reference", "engine", "zero3-export")
    if tf_why is None:
        try:
            from corea.models import make_tiny_checkpoint
            from corea.models.loading import load_tokenizer
        except Exception as exc:  # noqa: BLE001 (run from a folder where this package is not installed)
            tf_why = f"corea not importable ({type(exc).__name__}: {exc})"[:200]
    if tf_why is not None:
        for check in names:
            report(check, "SKIPPED", why=tf_why)
        return
    tmp = tempfile.TemporaryDirectory()
    model = args.model or str(make_tiny_checkpoint(Path(tmp.name) / args.size, args.size, seed=0))
    vocab = len(load_tokenizer(model))
    port = _free_port()
    if ds_why is not None:
        for check in ("policy-step", "zero3-export"):
            report(check, "SKIPPED", why=f"DeepSpeed: {ds_why}")
    else:
        run("policy-step", check_policy_step, args, model, cuda, port, vocab)
    run("reference", check_reference, args, model, cuda, vocab)
    run("engine", check_engine, args, model, cuda)
    if ds_why is None:
        run("zero3-export", check_zero3_export, args, model, cuda, port)


if __name__ == "__main__":
    sys.exit(main())
