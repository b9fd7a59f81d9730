"""How strategies reach the models: ``Tiers.answer`` (a whole answer) and ``Tiers.step`` (continue the assistant
message after a prefix up to the end of one step, with the probability of every generated token).

``EngineTiers`` runs two engines in this process and micro-batches concurrent calls into one engine call, so
that ``asyncio.gather`` over many questions runs them in lockstep (evaluation, benchmarks). Serving reaches the
tiers through Serve handles (``corea.serve.strategies``).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from corea.collab.steps import STEP_END


class TierUnavailable(Exception):
    """The tier is down, overloaded or too slow; clients may retry after ``retry_after_s``."""

    retry_after_s = 5.0

    def __init__(self, tier: str, reason: str):
        super().__init__(f"the {tier.upper()} tier is unavailable: {reason}")
        self.tier = tier


class TierOverloaded(TierUnavailable):
    """The tier's queue is full: the request was shed at once rather than left to time out."""

    retry_after_s = 1.0


class TierRejected(Exception):
    """The tier's model cannot take this request (a client error)."""


@dataclass
class Output:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    token_probs: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, d: dict[str, Any]) -> "Output":
        return cls(d["text"], int(d["prompt_tokens"]), int(d["completion_tokens"]), str(d.get("finish_reason") or "stop"),
                   list(d.get("token_probs") or []))


class Tiers(Protocol):
    async def answer(self, tier: str, messages: list[dict[str, str]], params: dict[str, Any]) -> Output: ...

    async def step(self, tier: str, messages: list[dict[str, str]], prefix: str, params: dict[str, Any]) -> Output: ...


def step_params(params: dict[str, Any], max_step_tokens: int) -> dict[str, Any]:
    """Sampling settings of one step: stop after the blank line (kept in the text), at most ``max_step_tokens``."""
    stop = list(dict.fromkeys([*(params.get("stop") or []), STEP_END]))
    return {**params, "max_tokens": int(min(params.get("max_tokens", max_step_tokens), max_step_tokens)),
            "min_tokens": 0, "stop": stop, "include_stop_str_in_output": True}


def sampling_params(params: dict[str, Any]):
    from corea.engines import SamplingParams

    return SamplingParams(n=1, temperature=float(params.get("temperature", 1.0)), top_p=float(params.get("top_p", 1.0)),
                          max_tokens=int(params["max_tokens"]), min_tokens=int(params.get("min_tokens", 0)),
                          seed=params.get("seed"),
                          stop=tuple(params.get("stop") or ()),
                          include_stop_str_in_output=bool(params.get("include_stop_str_in_output", False)))


def to_output(generation) -> dict[str, Any]:
    s = generation.samples[0]
    return {"text": s.text, "prompt_tokens": generation.prompt_tokens, "completion_tokens": s.output_tokens,
            "finish_reason": s.finish_reason, "token_probs": [math.exp(lp) for lp in s.logprobs]}


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


class EngineTiers:
    """Two in-process engines (``corea.engines``) behind ``Tiers``, concurrent calls batched per tier and settings."""

    def __init__(self, slm, llm, max_batch: int = 64, wait_s: float = 0.002) -> None:
        self.engines = {"slm": slm, "llm": llm}
        self.max_batch, self.wait_s = max_batch, wait_s
        self._batchers: dict[tuple, Any] = {}
        self.engine_s = 0.0  # seconds spent inside engine calls

    def _batcher(self, tier: str, kind: str, params: dict[str, Any]):
        from corea.collab.batching import MicroBatcher

        key = (tier, kind, _key(params))
        if key not in self._batchers:
            engine, sampling = self.engines[tier], sampling_params(params)

            def call(items: list):
                import time

                start = time.perf_counter()
                fn = engine.generate if kind == "answer" else engine.continue_prompts
                gens = fn(items, sampling)
                self.engine_s += time.perf_counter() - start
                return gens

            async def run(items: list) -> list[dict[str, Any]]:
                return [to_output(g) for g in await asyncio.to_thread(call, items)]

            self._batchers[key] = MicroBatcher(run, self.max_batch, self.wait_s)
        return self._batchers[key]

    async def answer(self, tier, messages, params) -> Output:
        return Output.of(await self._batcher(tier, "answer", params).submit(messages))

    async def step(self, tier, messages, prefix, params) -> Output:
        return Output.of(await self._batcher(tier, "step", params).submit((messages, prefix)))
