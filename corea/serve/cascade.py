"""The cascade rule, free of Ray and HTTP: ask the SLM, read its confidence, defer to the LLM below tau.

Tiers are reached through ``TierClient`` objects (a Serve handle in the application, an in-process server for
the direct SLM app, fakes in unit tests). ``generate`` returns ``{"text", "prompt_tokens", "completion_tokens",
"finish_reason"}``; ``stream`` yields ``{"delta": str}`` items and ends with one ``{"usage": {...},
"finish_reason": ...}`` item. A tier that fails or exceeds its timeout raises ``TierUnavailable`` (HTTP 503);
a request the model cannot take (e.g. longer than its context) raises ``TierRejected`` (HTTP 400).

Costs are the paper's, in SLM input-token units: C_SLM = n_in + 4 n_out and C_LLM = ratio * (n_in + 4 n_out)
over each tier's own tokens; a deferred query pays both.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from corea.collab.rules import defers
from corea.collab.tiers import TierOverloaded, TierRejected, TierUnavailable
from corea.cost import OUTPUT_TOKEN_WEIGHT
from corea.protocol import parse_response

MODES = ("cascade", "slm", "llm")
CHECK_WAIT_S = 2.0  # how long check_prompt waits for a tier's verdict before leaving the check to its own call
CHECK_QUIET_S = 10.0  # how long a tier that gave no verdict is not asked again
__all__ = ["Cascade", "CascadeResult", "CascadeStream", "TierAnswer", "TierClient", "TierOverloaded", "TierRejected",
           "TierUnavailable", "check_prompt"]


class TierClient(Protocol):
    async def generate(self, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, messages: list[dict[str, str]], params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...


@dataclass
class TierAnswer:
    tier: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_s: float
    cost: float

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass
class CascadeResult:
    """What one request got: the answering tier, the SLM's confidence, both tiers' tokens and costs."""

    model: str
    mode: str
    tier: str  # the tier whose answer is returned
    threshold: float | None
    confidence: float | None = None  # the SLM's; None when absent, invalid or not asked
    deferred: bool = False
    degraded: bool = False  # deferred, the LLM failed, and the SLM's answer was returned instead
    slm: TierAnswer | None = None
    llm: TierAnswer | None = None

    @property
    def answer(self) -> TierAnswer:
        return self.llm if self.tier == "llm" else self.slm

    @property
    def cost(self) -> float:
        return sum(t.cost for t in (self.slm, self.llm) if t is not None)

    def usage(self) -> tuple[int, int]:
        tiers = [t for t in (self.slm, self.llm) if t is not None]
        return sum(t.prompt_tokens for t in tiers), sum(t.completion_tokens for t in tiers)

    def trace(self) -> list[dict[str, Any]]:
        """One entry per tier call in the wire form of ``corea.collab.trace.Trace.steps`` (as the cascade strategy
        of ``corea.collab`` records it): the SLM's answer with its confidence as the score, then the LLM's when the
        request deferred; ``accepted`` marks the answer returned."""
        calls = []
        if self.slm is not None:
            calls.append({"tier": "slm", "role": "answer", "tokens": self.slm.completion_tokens,
                          "prompt_tokens": self.slm.prompt_tokens, "confidence": self.confidence,
                          "score": self.confidence, "accepted": self.tier == "slm"})
        if self.llm is not None:
            calls.append({"tier": "llm", "role": "answer", "tokens": self.llm.completion_tokens,
                          "prompt_tokens": self.llm.prompt_tokens, "confidence": None, "score": None,
                          "accepted": self.tier == "llm"})
        return calls

    def meta(self) -> dict[str, Any]:
        """The ``corea`` object of a response (``strategy`` is None for a forced tier)."""
        return {
            "strategy": "cascade" if self.mode == "cascade" else None,
            "trace": self.trace(),
            "llm_steps": int(self.llm is not None),
            "tier": self.tier,
            "mode": self.mode,
            "confidence": self.confidence,
            "threshold": self.threshold,
            "deferred": self.deferred,
            "degraded": self.degraded,
            "answer": parse_response(self.answer.text).answer if self.answer else None,
            "usage": {"slm": self.slm.usage() if self.slm else None, "llm": self.llm.usage() if self.llm else None},
            "cost": {"slm": self.slm.cost if self.slm else 0.0, "llm": self.llm.cost if self.llm else 0.0,
                     "total": self.cost},
            "latency_ms": {t.tier: round(1000 * t.latency_s, 3) for t in (self.slm, self.llm) if t is not None},
        }

    def headers(self, with_cost: bool = True) -> dict[str, str]:
        headers = {
            **({"x-corea-strategy": "cascade"} if self.mode == "cascade" else {}),
            "x-corea-tier": self.tier,
            "x-corea-confidence": "none" if self.confidence is None else f"{self.confidence:g}",
            "x-corea-deferred": str(self.deferred).lower(),
            "x-corea-degraded": str(self.degraded).lower(),
        }
        if self.threshold is not None:
            headers["x-corea-threshold"] = f"{self.threshold:g}"
        if with_cost:
            headers["x-corea-cost"] = f"{self.cost:.1f}"
        return headers


class CascadeStream:
    """A streamed answer whose routing is already decided: ``result`` carries the decision now and, once
    ``deltas()`` is exhausted, the answering tier's tokens and cost."""

    def __init__(self, result: CascadeResult, text: str | None = None,
                 items: Callable[[], Awaitable[dict | None]] | None = None, first: dict | None = None,
                 finish: Callable[[str, dict], None] | None = None,
                 close: Callable[[], Awaitable[None]] | None = None):
        self.result, self._text, self._items, self._first, self._finish = result, text, items, first, finish
        self._close = close

    async def deltas(self) -> AsyncIterator[str]:
        if self._text is not None:  # an answer already in hand (the SLM's)
            if self._text:
                yield self._text
            return
        parts: list[str] = []
        item = self._first
        try:
            while item is not None:
                if "usage" in item:
                    self._finish("".join(parts), item)
                    return
                if item.get("delta"):
                    parts.append(item["delta"])
                    yield item["delta"]
                item = await self._items()
            raise TierUnavailable(self.result.tier, "the stream ended without usage")
        finally:
            if self._close is not None:
                await self._close()


@dataclass
class Cascade:
    """Routes one request: ``mode`` "cascade" (the rule), "slm" or "llm" (one tier, forced)."""

    slm: TierClient | None
    llm: TierClient | None
    cost_ratio: float
    degrade_to_slm: bool = False
    slm_timeout_s: float = 60.0
    llm_timeout_s: float = 120.0
    _clock: Any = field(default=time.perf_counter, repr=False)

    def _client(self, tier: str) -> tuple[TierClient, float]:
        client = self.slm if tier == "slm" else self.llm
        if client is None:
            raise TierUnavailable(tier, "not deployed in this application")
        return client, self.slm_timeout_s if tier == "slm" else self.llm_timeout_s

    def _answer(self, tier: str, out: dict[str, Any], text: str, latency_s: float) -> TierAnswer:
        n_in, n_out = int(out["prompt_tokens"]), int(out["completion_tokens"])
        ratio = self.cost_ratio if tier == "llm" else 1.0
        cost = ratio * (n_in + OUTPUT_TOKEN_WEIGHT * n_out)  # corea.cost.token_cost, for one request
        return TierAnswer(tier, text, n_in, n_out, str(out.get("finish_reason") or "stop"), latency_s, cost)

    async def call(self, tier: str, messages: list[dict[str, str]], params: dict[str, Any]) -> TierAnswer:
        """One complete answer from one tier, within its timeout."""
        client, timeout = self._client(tier)
        start = self._clock()
        try:
            out = await asyncio.wait_for(client.generate(messages, params), timeout)
        except asyncio.TimeoutError:
            raise TierUnavailable(tier, f"no answer within {timeout:g} s") from None
        return self._answer(tier, out, out["text"], self._clock() - start)

    def _decide(self, slm: TierAnswer, mode: str, threshold: float) -> tuple[float | None, bool]:
        confidence = parse_response(slm.text).confidence
        return confidence, mode == "cascade" and defers(confidence, threshold)  # the collab cascade rule

    async def complete(self, messages, params, mode: str, threshold: float, model: str) -> CascadeResult:
        """The whole answer of the chosen tier (non-streaming)."""
        if mode == "llm":
            return CascadeResult(model, mode, "llm", None, llm=await self.call("llm", messages, params))
        slm = await self.call("slm", messages, params)
        confidence, deferred = self._decide(slm, mode, threshold)
        result = CascadeResult(model, mode, "slm", threshold if mode == "cascade" else None, confidence,
                               deferred, slm=slm)
        if deferred:
            try:
                result.llm, result.tier = await self.call("llm", messages, params), "llm"
            except TierUnavailable:
                if not self.degrade_to_slm:
                    raise
                result.degraded = True
        return result

    async def open_stream(self, messages, params, mode: str, threshold: float, model: str) -> CascadeStream:
        """Decide the route, then stream the answer: the SLM's is held until its confidence is known; the
        LLM's streams live. Errors before the first LLM chunk raise here, so they become plain HTTP errors."""
        slm, confidence, deferred = None, None, False
        if mode != "llm":
            slm = await self.call("slm", messages, params)
            confidence, deferred = self._decide(slm, mode, threshold)
        result = CascadeResult(model, mode, "slm" if mode != "llm" else "llm",
                               threshold if mode == "cascade" else None, confidence, deferred, slm=slm)
        if mode == "slm" or (mode == "cascade" and not deferred):
            return CascadeStream(result, text=slm.text)
        try:
            stream = await self._open_llm_stream(messages, params, result)
        except TierUnavailable:
            if mode == "llm" or not self.degrade_to_slm:
                raise
            result.degraded = True
            return CascadeStream(result, text=slm.text)
        result.tier = "llm"
        return stream

    async def _open_llm_stream(self, messages, params, result: CascadeResult) -> CascadeStream:
        client, timeout = self._client("llm")
        iterator = client.stream(messages, params).__aiter__()
        start = self._clock()

        async def next_item() -> dict | None:
            try:
                return await asyncio.wait_for(iterator.__anext__(), timeout)
            except StopAsyncIteration:
                return None
            except asyncio.TimeoutError:
                raise TierUnavailable("llm", f"no output for {timeout:g} s") from None

        def finish(text: str, item: dict) -> None:
            result.llm = self._answer("llm", {**item["usage"], "finish_reason": item.get("finish_reason")}, text,
                                      self._clock() - start)

        close = getattr(iterator, "aclose", None)
        try:
            first = await next_item()
            if first is None:
                raise TierUnavailable("llm", "the stream ended at once")
        except BaseException:
            if close is not None:
                await close()
            raise
        return CascadeStream(result, items=next_item, first=first, finish=finish, close=close)


async def check_prompt(clients: dict[str, Any], messages: list[dict[str, str]], params: dict[str, Any],
                       wait_s: float = CHECK_WAIT_S, quiet: dict[str, float] | None = None,
                       quiet_s: float = CHECK_QUIET_S) -> None:
    """Ask every tier a request may reach, all at once and before any of them generates, whether its model takes
    the request: the prompt within ``limits.max_prompt_tokens`` and prompt + ``max_tokens`` within the model's
    context (``continue_step`` with ``check_only``; clients without it are skipped). The first refusal is raised
    (``TierRejected``: HTTP 400), so that a prompt one tier cannot take is refused up front whatever the strategy
    and whichever tier would have answered. A tier that gives no verdict within ``wait_s`` (down, saturated) or
    fails is left to its own calls, which check again before generating; with ``quiet`` (tier -> monotonic time,
    kept by the caller across requests) it is not asked again for ``quiet_s``, so that an outage of the LLM costs
    SLM-answered requests at most one wait per ``quiet_s``."""
    now = time.monotonic()
    asked = {t: c for t, c in clients.items()
             if c is not None and hasattr(c, "continue_step") and (quiet or {}).get(t, 0.0) <= now}
    checks = {t: asyncio.ensure_future(c.continue_step(messages, "", {**params, "check_only": True}))
              for t, c in asked.items()}
    if not checks:
        return
    try:
        done, _ = await asyncio.wait(checks.values(), timeout=wait_s)
    finally:
        for task in checks.values():
            task.cancel()
    refused = None
    for tier, task in checks.items():
        failure = task.exception() if task in done and not task.cancelled() else TimeoutError()
        if isinstance(failure, TierRejected):
            refused = refused or failure
        elif failure is not None and quiet is not None:
            quiet[tier] = now + quiet_s
    if refused is not None:
        raise refused
