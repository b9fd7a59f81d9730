"""What holding whole groups costs an OpenRLHF rollout: the group reward server vs per-sample scoring.

Method
  P prompts x n samples (default 64 x 8) are posted as OpenRLHF 0.11.2's ``SingleTurnAgentExecutor`` posts
  them: one aiohttp session and one ``{"query": [q], "prompts": [p], "labels": [l]}`` request per sample, with
  its 180 s timeout. Each sample is sent when it "finishes generating": after a delay drawn uniformly from
  [0, spread] seconds (default 2 s), all prompts at once, as ``generate_responses`` gathers a prompt's samples.
  The same request stream goes to two servers in one run, both this project's app under uvicorn in this
  process, the same grading worker pool warmed up before:
    group:  n_samples_per_prompt = n, the L1 reward (each request held until its group is complete);
    sample: n_samples_per_prompt = 1, the sample-level L1 (each request graded alone, no holding), which is
            what a per-sample reward (OpenRLHF's file form) can do.
  Printed: the batch's wall time (first post to last answer; OpenRLHF waits for the whole batch anyway), and
  per-request latency (post to answer) p50 / p95 / max. The group server's extra latency is expected to be
  about the spread of a group's arrival times; its wall time about the same as per-sample scoring.

    python bench/openrlhf_reward_server.py [--prompts 64] [--n 8] [--spread 2.0] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corea import grading  # noqa: E402
from corea.integrations.group_reward_server import ServerThread  # noqa: E402
from corea.integrations.reward_server_config import RewardServerConfig  # noqa: E402
from corea.protocol import INSTRUCTION  # noqa: E402


def requests(prompts: int, n: int, spread: float, seed: int) -> list[tuple[float, str, str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(prompts):
        prompt = f"<|im_start|>user\nWhat is {i} + {i}? {INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
        for j in range(n):
            answer = 2 * i if rng.random() < 0.6 else 2 * i + 1
            form = f"{i} + {answer - i}" if j % 2 else str(answer)  # half need math-verify
            response = f"{i} + {i} = \\boxed{{{form}}} \\confidence{{{rng.randint(0, 10) / 10}}}<|im_end|>"
            out.append((rng.uniform(0, spread), prompt + response, prompt, str(2 * i)))
    return out


async def run(url: str, stream: list[tuple[float, str, str, str]]) -> tuple[float, list[float]]:
    timeout = aiohttp.ClientTimeout(total=180)

    async def one(delay, query, prompt, label):
        await asyncio.sleep(delay)
        start = time.monotonic()
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(url, json={"query": [query], "prompts": [prompt], "labels": [label]}) as r:
                r.raise_for_status()
                await r.json()
        return time.monotonic() - start

    start = time.monotonic()
    latencies = await asyncio.gather(*(one(*item) for item in stream))
    return time.monotonic() - start, list(latencies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--spread", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(__doc__.split("\n    python")[0])
    grading.get_grader().warmup()
    stream = requests(args.prompts, args.n, args.spread, args.seed)
    print(f"{len(stream)} requests, spread {args.spread} s, load average {os.getloadavg()[0]:.1f} at start")
    rows = []
    for name, n, reward in (("group", args.n, "l1"), ("sample", 1, "sample_l1")):
        server = ServerThread(RewardServerConfig(host="127.0.0.1", port=0, n_samples_per_prompt=n,
                                                 confidence_reward=reward)).start()
        try:
            asyncio.run(run(server.url, stream[: args.n]))  # connections and routes warm
            wall, lat = asyncio.run(run(server.url, [(d, q + " ", p, lab) for d, q, p, lab in stream]))
        finally:
            server.stop()
        lat.sort()
        rows.append((name, wall, statistics.median(lat), lat[int(0.95 * (len(lat) - 1))], lat[-1]))
    print(f"\n{'server':8} {'wall s':>8} {'p50 s':>8} {'p95 s':>8} {'max s':>8}")
    for name, wall, p50, p95, worst in rows:
        print(f"{name:8} {wall:8.2f} {p50:8.3f} {p95:8.3f} {worst:8.3f}")
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
