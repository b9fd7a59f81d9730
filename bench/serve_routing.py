"""Routing overhead of served step-level strategies: request time beyond the tiers' own generation time.

Method
  One Ray Serve application (configs/serve-tiny-cpu.yaml: tiny:slm-confident and a random tiny:llm, one
  replica each, CPU) serves STEER; requests one at a time (c = 1) with the `httpx` client, greedy, a 3-step
  answer of at most 8 tokens per step. At tau = 1.1 every step is drafted by the SLM and handed to the LLM
  (3 handoffs, 6 tier calls per request); at tau = 0 no step is (1 SLM call, no handoff). For each request,
  overhead = client wall time - the engines' own time (measured inside each replica around the engine call and
  returned with the step). Side by side, the obvious alternative: the same strategy over the same checkpoints
  in this process (corea.collab.tiers.EngineTiers, no Serve, no HTTP), overhead measured the same way.
  Per handoff = (overhead at tau 1.1 - overhead at tau 0) / handoffs per request.

    python bench/serve_routing.py [--requests 20] [--json PATH]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = "What is 1 + 2?"
STRATEGY = {"max_steps": 3, "max_step_tokens": 8}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(work: Path, n: int) -> dict:
    import httpx
    import ray
    from ray import serve

    from corea.serve.app import deploy
    from corea.serve.config import load_serve_config

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = load_serve_config(ROOT / "configs/serve-tiny-cpu.yaml", {
        "work_dir": str(work), "http.port": _port(), "slm.autoscaling.max_replicas": 1,
        "llm.autoscaling.max_replicas": 1, "strategies.max_steps": STRATEGY["max_steps"],
        "strategies.max_step_tokens": STRATEGY["max_step_tokens"]})
    url = deploy(cfg)[cfg.name]
    out = {}
    with httpx.Client(timeout=120) as client:
        for tau in (0.0, 1.1, 0.0, 1.1):  # the first pass of each warms up
            rows = []
            for _ in range(n):
                body = {"model": "corea-cascade", "messages": [{"role": "user", "content": QUESTION}],
                        "temperature": 0, "max_tokens": 24, "corea": {"strategy": "steer", "threshold": tau}}
                start = time.perf_counter()
                reply = client.post(f"{url}/v1/chat/completions", json=body)
                wall = time.perf_counter() - start
                reply.raise_for_status()
                meta = reply.json()["corea"]
                rows.append({"wall_s": wall, "engine_s": meta["latency_ms"]["engines"] / 1000,
                             "llm_steps": meta["llm_steps"], "calls": len(meta["trace"])})
            out[tau] = rows
    serve.shutdown()
    ray.shutdown()
    return out


def in_process(work: Path, n: int) -> dict:
    from corea.collab.strategies import Settings, steer
    from corea.collab.tiers import EngineTiers
    from corea.engines import load_engine
    from corea.protocol import INSTRUCTION
    from corea.serve.tiny import resolve_tier_model

    engines = [load_engine(resolve_tier_model(m, work), device="cpu") for m in ("tiny:slm-confident", "tiny:llm")]
    messages = [{"role": "user", "content": f"{QUESTION}\n{INSTRUCTION}"}]
    params = {"max_tokens": 24, "temperature": 0.0, "top_p": 1.0, "seed": None}
    out = {}
    for tau in (0.0, 1.1, 0.0, 1.1):
        rows = []
        for _ in range(n):
            tiers = EngineTiers(*engines, wait_s=0.0)
            start = time.perf_counter()
            trace = asyncio.run(steer(tiers, messages, params, Settings(threshold=tau, **STRATEGY)))
            rows.append({"wall_s": time.perf_counter() - start, "engine_s": tiers.engine_s,
                         "llm_steps": trace.llm_steps, "calls": len(trace.calls)})
        out[tau] = rows
    return out


def summarize(rows_by_tau: dict) -> dict:
    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    s = {}
    for tau, rows in rows_by_tau.items():
        s[tau] = {"wall_ms": 1000 * med(rows, "wall_s"), "engine_ms": 1000 * med(rows, "engine_s"),
                  "overhead_ms": 1000 * statistics.median(r["wall_s"] - r["engine_s"] for r in rows),
                  "llm_steps": med(rows, "llm_steps"), "calls": med(rows, "calls")}
    hand = s[1.1]["llm_steps"]
    s["per_handoff_ms"] = (s[1.1]["overhead_ms"] - s[0.0]["overhead_ms"]) / hand if hand else float("nan")
    s["per_call_ms"] = s[1.1]["overhead_ms"] / s[1.1]["calls"]
    return s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(__doc__.split("    python")[0])
    print(f"load average before: {os.getloadavg()}")
    work = Path(tempfile.mkdtemp(prefix="corea-serve-routing-"))
    results = {"served": summarize(served(work, args.requests)), "in_process": summarize(in_process(work, args.requests))}
    print(f"load average after: {os.getloadavg()}")
    print(f"\n{'path':<12}{'tau':>5}{'calls':>7}{'LLM steps':>11}{'wall ms':>10}{'engines ms':>12}{'overhead ms':>13}")
    for path, s in results.items():
        for tau in (0.0, 1.1):
            r = s[tau]
            print(f"{path:<12}{tau:>5}{r['calls']:>7.0f}{r['llm_steps']:>11.0f}{r['wall_ms']:>10.1f}{r['engine_ms']:>12.1f}"
                  f"{r['overhead_ms']:>13.1f}")
    for path, s in results.items():
        print(f"{path}: routing overhead per handoff {s['per_handoff_ms']:.1f} ms, per tier call {s['per_call_ms']:.1f} ms")
    ok = results["served"]["per_handoff_ms"] < 20
    print(f"target (served overhead per handoff < 20 ms): {'met' if ok else 'not met'}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({k: {str(t): v for t, v in s.items()} for k, s in results.items()},
                                                   indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
