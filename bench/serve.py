"""Serving benchmarks: the cascade's own overhead on requests the SLM answers; our LLM tier against `vllm serve`.

Method
    A local Ray cluster runs configs/serve-tiny-cpu.yaml with one replica per deployment, plus the standalone
    SLM application (`direct_slm`): one Serve deployment that is both the HTTP ingress and the SLM engine,
    with the same tier config (engine, micro-batching, threads), the same OpenAI schema, validation, prompt
    (instruction appended) and response body. The cascade path is proxy -> CascadeIngress -> SLM replica
    (a deployment-handle hop) -> confidence parse and routing decision; the direct path is proxy -> SLM
    replica. Both answer with the same tiny SLM (`tiny:slm-confident`) at temperature 0 and max_tokens 16, on a
    question it answers with confidence 0.9 at tau 0.5, so every cascade request stays on the SLM (checked).
    The difference of the two latencies is what the cascade adds to serving the SLM alone.
    Load: httpx.AsyncClient closed loops after a warm-up. At c = 1 the two paths alternate request by request
    (the order flipping every pair), so both see the same machine load; the overhead is the median of the
    paired differences and req/s = 1 / mean latency. At c = 8 and 32, c requests are kept in flight on one
    path at a time, in alternating rounds; req/s = completed / wall time. The load generator shares the
    machine's cores with Ray, so absolute figures are machine-bound; the load average is recorded.

    python bench/serve.py [--requests 200] [--rounds 2] [--json PATH]

Method of --against vllm: see bench/serve_vs_vllm.py (our endpoint's LLM tier against vLLM's own OpenAI server).

    python bench/serve.py --against vllm [...]  (the same as python bench/serve_vs_vllm.py [...])
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = "What is 1 + 1?"  # the tiny confident SLM answers it with \confidence{0.9}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class Target(NamedTuple):
    """Where requests go: the URL, the JSON body of request ``i`` and a check of each answer (raises if wrong)."""

    url: str
    body: Callable[[int], dict]
    check: Callable[[dict], None] | None = None


def cascade_target(url: str, model: str, stays_on_slm: bool) -> Target:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": 16, "corea": {"threshold": 0.5}}
    return Target(url, lambda i: body, _check_slm if stays_on_slm else None)


def _check_slm(answer: dict) -> None:
    if answer["corea"]["tier"] != "slm":
        raise RuntimeError("a cascade request left the SLM; the benchmark would not measure overhead")


class HTTPFailure(RuntimeError):
    def __init__(self, url: str, status: int, text: str) -> None:
        super().__init__(f"{url}: HTTP {status}: {text[:300]}")
        self.status, self.text = status, text[:300]


async def timed(http, target: Target, i: int = 0) -> tuple[float, dict]:
    """Seconds for request ``i`` on ``target``, and its ``usage``."""
    start = time.perf_counter()
    resp = await http.post(target.url, json=target.body(i))
    elapsed = time.perf_counter() - start
    if resp.status_code != 200:
        raise HTTPFailure(target.url, resp.status_code, resp.text)
    answer = resp.json()
    if target.check is not None:
        target.check(answer)
    return elapsed, answer.get("usage") or {}


def _client(concurrency: int):
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(timeout=120, limits=limits)


async def load(target: Target, concurrency: int, total: int,
               failures: list | None = None) -> tuple[list[float], float, list[dict]]:
    """Latencies (s) and usages of ``total`` requests at ``concurrency`` in flight on one target, and the wall
    time. A non-200 answer (or a broken connection) raises, or with ``failures`` is appended there as ``(status,
    body)`` (status 0 for a connection error) and left out of the latencies."""
    import httpx

    latencies: list[float] = []
    usages: list[dict] = []
    remaining = iter(range(total))
    async with _client(concurrency) as http:
        async def worker():
            for i in remaining:
                try:
                    elapsed, usage = await timed(http, target, i)
                except (HTTPFailure, httpx.TransportError) as exc:
                    if failures is None:
                        raise
                    failures.append((getattr(exc, "status", 0), getattr(exc, "text", repr(exc))))
                    continue
                latencies.append(elapsed)
                usages.append(usage)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - start, usages


async def paired(paths: dict, pairs: int) -> dict[str, list[float]]:
    """One request at a time, alternating the paths (order flipped every pair)."""
    out: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    async with _client(1) as http:
        for i in range(pairs):
            for name in names if i % 2 == 0 else names[::-1]:
                out[name].append((await timed(http, paths[name], i))[0])
    return out


def summarize(lat: dict[str, list[float]], wall: dict[str, float] | None) -> dict[str, float]:
    row: dict[str, float] = {}
    for name, values in lat.items():
        seconds = wall[name] if wall else sum(values)
        row[f"{name}_rps"] = round(len(values) / seconds, 1)
        row[f"{name}_p50_ms"] = round(1000 * statistics.median(values), 2)
        row[f"{name}_p99_ms"] = round(1000 * percentile(values, 99), 2)
    return row


def deploy(work_dir: Path, port: int):
    import ray

    from corea.serve.app import deploy as deploy_apps
    from corea.serve.config import load_serve_config
    from corea.serve.tiny import confident_slm_path, make_confident_slm

    make_confident_slm(confident_slm_path(work_dir))  # built once; the replicas find it there
    cfg = load_serve_config(ROOT / "configs/serve-tiny-cpu.yaml", {
        "work_dir": str(work_dir), "http.port": port, "direct_slm": {},
        "slm.autoscaling.max_replicas": 1, "llm.autoscaling.max_replicas": 1,
    })
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    return deploy_apps(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", choices=["direct", "vllm"], default="direct",
                        help="direct: the cascade against the SLM served alone; vllm: our LLM tier against vllm serve")
    parser.add_argument("--requests", type=int, help="requests per path, level and round (c = 1: pairs per "
                        "round; default 200); with --against vllm: per level and session (default 32 at c = 1, "
                        "8 x c above)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", help="default 1 8 32; with --against vllm 1 32")
    parser.add_argument("--sessions", type=int, default=2, help="--against vllm: server sessions, alternating")
    parser.add_argument("--first", choices=["corea", "vllm"], default="corea", help="--against vllm: first server")
    parser.add_argument("--max-tokens", type=int, default=64, help="--against vllm: tokens per answer")
    parser.add_argument("--startup-timeout", type=float, default=900, help="--against vllm: seconds per start")
    parser.add_argument("--profile", type=Path, help="--against vllm: py-spy one extra load, stacks into this folder")
    parser.add_argument("--vllm-logprobs", action="store_true",
                        help="--against vllm: also load vllm serve with log-probabilities asked for, as our tier asks")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.against == "vllm":
        from serve_vs_vllm import compare_vllm

        results = compare_vllm(args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    args.requests = args.requests or 200
    args.concurrency = args.concurrency or [1, 8, 32]

    import ray
    from ray import serve

    print(__doc__.split("Method", 1)[1].split("python bench", 1)[0].rstrip())
    with tempfile.TemporaryDirectory(prefix="corea-bench-serve-") as tmp:
        urls = deploy(Path(tmp), _free_port())
        paths = {"cascade": cascade_target(f"{urls['corea']}/v1/chat/completions", "corea-cascade", True),
                 "direct": cascade_target(f"{urls['corea-slm-direct']}/v1/chat/completions", "corea-slm", False)}
        try:
            for path in paths.values():  # warm-up: caches, connections, batcher
                asyncio.run(load(path, 8, 64))
            results = {"load_average_start": round(os.getloadavg()[0], 2)}
            for c in args.concurrency:
                if c == 1:
                    lat = asyncio.run(paired(paths, args.requests * args.rounds))
                    row = summarize(lat, None)
                    diffs = [a - b for a, b in zip(lat["cascade"], lat["direct"])]
                    row["overhead_p50_ms"] = round(1000 * statistics.median(diffs), 2)
                else:
                    lat, wall = {n: [] for n in paths}, {n: 0.0 for n in paths}
                    for _ in range(args.rounds):
                        for name, path in paths.items():
                            values, seconds, _ = asyncio.run(load(path, c, args.requests))
                            lat[name] += values
                            wall[name] += seconds
                    row = summarize(lat, wall)
                    row["overhead_p50_ms"] = round(row["cascade_p50_ms"] - row["direct_p50_ms"], 2)
                results[f"c{c}"] = row
                print(f"c={c:<3} cascade {row['cascade_rps']:7.1f} req/s p50 {row['cascade_p50_ms']:7.2f} ms "
                      f"p99 {row['cascade_p99_ms']:7.2f} ms | direct {row['direct_rps']:7.1f} req/s "
                      f"p50 {row['direct_p50_ms']:7.2f} ms p99 {row['direct_p99_ms']:7.2f} ms | "
                      f"overhead p50 {row['overhead_p50_ms']:+.2f} ms", flush=True)
            results["load_average_end"] = round(os.getloadavg()[0], 2)
            print(f"load average (1 min) {results['load_average_start']} -> {results['load_average_end']} "
                  f"on {os.cpu_count()} cores")
        finally:
            serve.shutdown()
            ray.shutdown()
    target = results.get("c1", {}).get("overhead_p50_ms")
    if target is not None:
        print(f"cascade overhead at c=1, p50: {target:.2f} ms (target < 10 ms): {'met' if target < 10 else 'NOT met'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
