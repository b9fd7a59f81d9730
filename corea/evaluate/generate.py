"""Batch generation of evaluation records with Ray Data.

Questions become rows (dataset, group, id, gold, kind, messages as JSON, seed). Two generation paths:

- transformers (anywhere): ``ds.map_batches(GenerateBatch, compute=ActorPoolStrategy(size=...))``, an actor pool
  each holding an engine; one call per question draws its k runs as n=k samples seeded with the question's
  seed, so run r of a question is the same whatever the batching.
- vLLM on GPUs: ``ray.data.llm`` with a ``vLLMEngineProcessorConfig``; rows are first expanded to one per
  (question, run), each with its own seed, since the processor draws one sample per row.
- vLLM without GPUs (``num_gpus`` 0, vLLM's CPU build): the actor pool above holding our ``VLLMEngine``. Ray 2.60's
  ``ray.data.llm`` processor asks Ray for one GPU per engine replica whatever its engine arguments, so on a
  cluster without GPUs it waits forever.

Both are followed by ``grade_batch`` tasks (parse, grade) and read back with a tqdm bar over rows and datasets.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Sequence

import numpy as np
import pandas as pd

from corea.data import Record
from corea.data.registry import DATASETS
from corea.evaluate.baselines import parse_router_prob, router_messages
from corea.evaluate.records import question_seed

STYLES = ("corea", "router")


@dataclass(frozen=True)
class GenerationJob:
    """Everything one model's generation pass needs (plain values, shipped to the actors)."""

    role: str
    model_path: str
    style: str = "corea"  # "corea": the COREA prompt, graded; "router": the Router prompt, p_router parsed
    runs: int = 10
    temperature: float = 0.6
    top_p: float = 1.0
    max_tokens: int = 4096
    seed: int = 0
    backend: str = "transformers"
    options: dict = field(default_factory=dict)
    concurrency: int = 1
    batch_size: int = 8
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    grade_concurrency: int = 1
    grade_cpus: float = 0.5

    def fingerprint(self) -> dict:
        """What determines the generated records (for reusing a saved pass)."""
        keys = ("role", "model_path", "style", "runs", "temperature", "top_p", "max_tokens", "seed", "backend",
                "options")
        return {k: getattr(self, k) for k in keys}


def question_rows(records: Sequence[Record], style: str, seed: int) -> list[dict[str, Any]]:
    """One row per question: the prompt as chat messages (JSON) and the question's sampling seed."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    rows = []
    for r in records:
        messages = r.messages() if style == "corea" else router_messages(r)
        group = DATASETS[r.dataset].group if r.dataset in DATASETS else "custom"
        rows.append({"dataset": r.dataset, "group": group, "id": r.id, "gold": r.gold, "kind": r.kind,
                     "messages": json.dumps(messages, ensure_ascii=False),
                     "seed": question_seed(seed, r.dataset, r.id)})
    return rows


_CARRY = ("dataset", "group", "id", "gold", "kind")


class GenerateBatch:
    """Ray Data callable class: an engine of ``job.backend``; each question row becomes ``runs`` output rows.

    Each question is sampled with its own seed. The transformers engine takes the questions one call each; vLLM's
    async engine takes the whole batch at once (one request per question, batched continuously by vLLM)."""

    def __init__(self, job: GenerationJob):
        import torch

        from corea.engines import load_engine

        torch.set_num_threads(max(1, int(job.num_cpus)))
        self.job = job
        options = {"async_engine": True, **job.options} if job.backend == "vllm" else job.options
        self.engine = load_engine(job.model_path, job.backend, **options)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import asyncio

        from corea.engines import SamplingParams

        job, out = self.job, []
        rows = list(batch.itertuples(index=False))
        prompts = [json.loads(row.messages) for row in rows]
        params = [SamplingParams(n=job.runs, temperature=job.temperature, top_p=job.top_p,
                                 max_tokens=job.max_tokens, seed=int(row.seed)) for row in rows]
        if hasattr(self.engine, "agenerate"):
            async def together():
                return await asyncio.gather(*(self.engine.agenerate([m], p) for m, p in zip(prompts, params)))

            gens = [g[0] for g in asyncio.run(together())]
        else:
            gens = [self.engine.generate([m], p)[0] for m, p in zip(prompts, params)]
        for row, gen in zip(rows, gens):
            for run, s in enumerate(gen.samples):
                out.append({**{k: getattr(row, k) for k in _CARRY}, "run": run, "model": job.role,
                            "model_path": job.model_path, "response": s.text, "prompt_tokens": gen.prompt_tokens,
                            "output_tokens": s.output_tokens, "mean_token_prob": s.mean_token_prob,
                            "finish_reason": s.finish_reason})
        return pd.DataFrame(out)


def grade_batch(batch: pd.DataFrame, style: str = "corea", processes: int = 1) -> pd.DataFrame:
    """Answer, confidence and correctness of each response (run as Ray Data tasks; the grader's worker
    processes live on in the reused Ray worker).

    ``corea`` style: the whole response graded against gold (``corea.grading``); the last \\boxed{} is the
    answer shown, the last \\confidence{} the confidence. ``router`` style:
    confidence = p_router (the first number of the output, valid in [0, 1]), answer None, correct False."""
    from corea import grading
    from corea.protocol import parse_response

    batch = batch.copy()
    texts = [str(t) for t in batch["response"]]
    if style == "router":
        batch["answer"] = None
        batch["confidence"] = [np.nan if (p := parse_router_prob(t)) is None else p for t in texts]
        batch["correct"] = False
        return batch
    grader = grading.get_grader()
    if grader.processes != processes and not grader.worker_pids():
        grader = grading.configure(processes=max(1, processes))
    parsed = [parse_response(t) for t in texts]
    verdicts = grader.grade_groups([([t], g, k) for t, g, k in zip(texts, batch["gold"], batch["kind"])])
    batch["answer"] = [p.answer for p in parsed]
    batch["confidence"] = [np.nan if p.confidence is None else p.confidence for p in parsed]
    batch["correct"] = [bool(v[0]) for v in verdicts]
    return batch


# ------------------------------------------------------------------------------------------- vLLM
def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def expand_runs(row: dict, runs: int) -> list[dict]:
    """One row per run r with its own seed (the question's seed mixed with r)."""
    return [{**row, "run": r, "seed": (int(row["seed"]) * 1_000_003 + r) % 2**31} for r in range(runs)]


def vllm_preprocess(row: dict, temperature: float, top_p: float, max_tokens: int) -> dict:
    """The processor's input: chat ``messages`` and per-row ``sampling_params`` (sampled token's logprob)."""
    return {**row, "messages": json.loads(row["messages"]),
            "sampling_params": {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
                                "seed": int(row["seed"]), "logprobs": 0}}


def sampled_logprobs(logprobs: Any, token_ids: Sequence[int]) -> list[float]:
    """log p of each sampled token from ray.data.llm's ``logprobs`` column (Ray 2.60 ``vLLMOutputData.logprobs``:
    per generated token, token id -> {"logprob", "rank", "decoded_token"}). A missing column (``None`` with
    tokens generated: the processor was built without ``logprobs`` in its sampling params, or by a Ray release
    before 2.53) raises instead of averaging nothing into 0.0."""
    token_ids = list(token_ids)
    if logprobs is None:
        if token_ids:
            raise ValueError("ray.data.llm returned no 'logprobs' for a generated sample (needs Ray >= 2.53 and "
                             "sampling_params.logprobs set); mean_token_prob cannot be computed")
        return []
    out = []
    for position, (entry, token) in enumerate(zip(logprobs, token_ids)):
        item = entry.get(int(token), entry.get(str(int(token)))) if hasattr(entry, "get") else None
        if item is None and entry is not None and len(entry) == 1:
            item = next(iter(entry.values()))
        if item is None:
            raise ValueError(f"ray.data.llm's logprobs hold no entry for sampled token {token} at position {position}")
        out.append(float(item["logprob"] if hasattr(item, "__getitem__") else item.logprob))
    if len(out) != len(token_ids):
        raise ValueError(f"ray.data.llm returned {len(out)} logprobs for {len(token_ids)} generated tokens")
    return out


def finish_reason(output_tokens: int, max_tokens: int) -> str:
    """Ray 2.60's processor rows carry no finish reason; a sample that used its whole token budget was cut
    ("length"), any shorter one ended on EOS or a stop string ("stop"). (A sample whose EOS is exactly the
    max_tokens-th token is counted as "length".)"""
    return "length" if output_tokens >= max_tokens else "stop"


def vllm_postprocess(row: dict, role: str, model_path: str, max_tokens: int) -> dict:
    """A record row from the processor's output row."""
    tokens = list(row.get("generated_tokens") if row.get("generated_tokens") is not None else [])
    lps = sampled_logprobs(row.get("logprobs"), tokens)
    output_tokens = int(row.get("num_generated_tokens") or len(tokens))
    return {**{k: row[k] for k in _CARRY}, "run": int(row["run"]), "model": role, "model_path": model_path,
            "response": row.get("generated_text") or "", "prompt_tokens": int(row["num_input_tokens"]),
            "output_tokens": output_tokens,
            "mean_token_prob": float(np.mean(np.exp(lps))) if lps else 0.0,
            "finish_reason": finish_reason(output_tokens, max_tokens)}


def vllm_processor_config(job: GenerationJob):
    """Ray 2.60's ``vLLMEngineProcessorConfig`` for ``job``: ``model_source`` the checkpoint folder, ``engine_kwargs``
    the vLLM engine arguments, ``concurrency`` engine replicas (the processor's own field), ``batch_size`` rows."""
    from ray.data import llm as ray_llm

    return ray_llm.vLLMEngineProcessorConfig(
        model_source=job.model_path,
        engine_kwargs=dict(job.options),
        concurrency=job.concurrency,
        batch_size=job.batch_size,
    )


def vllm_processor(job: GenerationJob):
    """A ``ray.data.llm`` processor for ``job`` (``build_processor``, Ray >= 2.53)."""
    if not vllm_available():
        raise RuntimeError(f"models.{job.role}: backend 'vllm' needs vLLM installed (pip install -e '.[vllm]')")
    from ray.data import llm as ray_llm

    return ray_llm.build_processor(
        vllm_processor_config(job),
        preprocess=partial(vllm_preprocess, temperature=job.temperature, top_p=job.top_p, max_tokens=job.max_tokens),
        postprocess=partial(vllm_postprocess, role=job.role, model_path=job.model_path, max_tokens=job.max_tokens),
    )


# ------------------------------------------------------------------------------------------ driver
def generate(job: GenerationJob, records: Sequence[Record], progress: bool = True) -> pd.DataFrame:
    """Records of ``job`` over ``records`` (any datasets): one row per (dataset, id, run), graded."""
    import ray.data
    from tqdm import tqdm

    if not records:
        raise ValueError(f"{job.role}: no questions to generate for")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items(question_rows(records, job.style, job.seed))
    if job.backend == "vllm" and job.num_gpus > 0:
        ds = vllm_processor(job)(ds.flat_map(partial(expand_runs, runs=job.runs)))
    elif job.backend in ("transformers", "vllm"):
        ds = ds.map_batches(GenerateBatch, fn_constructor_kwargs={"job": job},
                            compute=ray.data.ActorPoolStrategy(size=job.concurrency),
                            batch_size=job.batch_size, batch_format="pandas", num_cpus=job.num_cpus,
                            num_gpus=job.num_gpus or None)
    else:
        raise ValueError(f"backend must be 'transformers' or 'vllm', got {job.backend!r}")
    ds = ds.map_batches(grade_batch, fn_kwargs={"style": job.style, "processes": math.ceil(job.grade_cpus)},
                        compute=ray.data.TaskPoolStrategy(size=job.grade_concurrency), batch_size=64,
                        batch_format="pandas",
                        num_cpus=job.grade_cpus)
    totals = pd.Series([r.dataset for r in records]).value_counts() * job.runs
    done = dict.fromkeys(totals.index, 0)
    frames = []
    from corea.console import terminal

    with tqdm(total=int(totals.sum()), desc=f"eval {job.role}", unit="row", disable=not progress,
              file=terminal()) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            frames.append(batch)
            for name, n in batch["dataset"].value_counts().items():
                done[name] += int(n)
            bar.update(len(batch))
            bar.set_postfix_str(f"datasets {sum(done[d] >= totals[d] for d in done)}/{len(done)}")
    frame = pd.concat(frames, ignore_index=True)
    return frame.drop(columns=[c for c in ("messages", "seed") if c in frame]).sort_values(
        ["dataset", "id", "run"], kind="stable").reset_index(drop=True)
