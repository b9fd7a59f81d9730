"""Serving memory benchmark: resident memory of the SLM and LLM replicas over thousands of requests.

Method
    A local Ray cluster runs configs/serve-tiny-cpu.yaml with one replica per deployment (the API keys and
    the proxy middleware as `corea serve` sets them). httpx clients keep `--concurrency` requests in flight;
    every request is a question the tiny SLM answers with confidence 0.2, so it is deferred and both tiers
    serve it; one in two is streamed (the LLM streams live), one in eight is malformed or hostile (deep JSON,
    a lone surrogate, an over-long prompt, an unsupported field), at temperature 0.6 (a fresh sample each time)
    and max_tokens 16. After every `--step` requests the resident set (VmRSS of /proc/PID/status) of each
    replica process is read. The figures: RSS at the end of the warm-up (the first step), growth per 1,000
    requests over the first and the second half of the run (least-squares slope), side by side for the SLM
    replica (which serves whole answers only) and the LLM replica (whole answers and streams). A slope in the
    second half near zero, and well under the first, means the replica levels off rather than leaks.

    python bench/serve_memory.py [--requests 4000] [--step 250] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HARD = "Prove that the sum of two odd numbers is even."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def slope_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MB) against requests, times 1,000."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def replica_pids(app: str) -> dict[str, int]:
    import ray

    out = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        for kind in ("SLM", "LLM", "CascadeIngress"):
            if f"{app}#{kind}#" in entry["name"]:
                handle = ray.get_actor(entry["name"], namespace=entry["namespace"])
                out[kind] = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))
    return out


def requests_mix() -> list[dict]:
    def body(**extra):
        return {"model": "corea-cascade", "messages": [{"role": "user", "content": HARD}], "temperature": 0.6,
                "max_tokens": 16, **extra}

    js = {"content-type": "application/json"}
    hostile = [{"content": b"[" * 969, "headers": js},
               {"content": json.dumps(body(messages=[{"role": "user", "content": "\ud800"}])).encode(), "headers": js},
               {"json": body(messages=[{"role": "user", "content": "word " * 3000}])},
               {"json": body(logprobs=True)}]
    mix = []
    for i in range(8):
        mix.append({"json": body(stream=i % 2 == 0)} if i < 7 else hostile)
    return mix


async def drive(url: str, total: int, step: int, concurrency: int, pids: dict[str, int]) -> list[tuple]:
    import httpx

    mix = requests_mix()
    samples, done, statuses = [], 0, {}
    lock = asyncio.Lock()
    next_index = 0

    async def worker(http):
        nonlocal done, next_index
        while True:
            async with lock:
                if next_index >= total:
                    return
                i = next_index
                next_index += 1
            args = mix[i % len(mix)]
            if isinstance(args, list):
                args = args[(i // len(mix)) % len(args)]
            resp = await http.post("/v1/chat/completions", **args)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            async with lock:
                done += 1
                if done % step == 0:
                    samples.append((done, rss_mb(pids["SLM"]), rss_mb(pids["LLM"]), rss_mb(pids["CascadeIngress"])))

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return samples, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--step", type=int, default=250)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    import ray
    from ray import serve

    from corea.serve.app import deploy, prepare
    from corea.serve.cli import _connect
    from corea.serve.config import load_serve_config

    print(__doc__.split("Method", 1)[1].split("python bench")[0].rstrip())
    work = Path(tempfile.mkdtemp(prefix="corea-serve-memory-"))
    port = _free_port()
    name = f"mem{port}"
    cfg = prepare(load_serve_config(ROOT / "configs/serve-tiny-cpu.yaml", {
        "name": name, "work_dir": str(work), "http.port": port, "slm.autoscaling.max_replicas": 1,
        "llm.autoscaling.max_replicas": 1}))
    os.environ.pop("RAY_ADDRESS", None)
    _connect(cfg)
    try:
        deploy(cfg)
        deadline = time.time() + 300
        while serve.status().applications[name].status != "RUNNING" and time.time() < deadline:
            time.sleep(1)
        pids = replica_pids(name)
        start = time.perf_counter()
        samples, statuses = asyncio.run(drive(f"http://127.0.0.1:{port}", args.requests, args.step,
                                              args.concurrency, pids))
        elapsed = time.perf_counter() - start
    finally:
        serve.shutdown()
        ray.shutdown()
    half = len(samples) // 2
    print(f"\n{args.requests} requests in {elapsed:.0f} s at c={args.concurrency}; statuses {statuses}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'requests':>9} {'SLM MB':>8} {'LLM MB':>8} {'ingress MB':>11}")
    for n, slm, llm, ingress in samples:
        print(f"{n:>9} {slm:>8.1f} {llm:>8.1f} {ingress:>11.1f}")
    for col, kind in ((1, "SLM"), (2, "LLM"), (3, "ingress")):
        first = slope_per_1000([(s[0], s[col]) for s in samples[: half + 1]])
        second = slope_per_1000([(s[0], s[col]) for s in samples[half:]])
        print(f"{kind:>8}: {samples[0][col]:.1f} MB after {samples[0][0]} requests; growth per 1,000 requests "
              f"{first:+.2f} MB (first half), {second:+.2f} MB (second half)")


if __name__ == "__main__":
    main()
