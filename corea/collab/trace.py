"""The record of one strategy run: every call with its tier, role, tokens, cache hits and confidence; its costs.

Per call (``corea.cost``): cost = r_t (n_in + 4 n_out); cached = r_t ((n_in - n_c) + 0.1 n_c + 4 n_out);
FLOPs = 2 N_t ((n_in - n_c) + n_out), with r_slm = 1, r_llm = N_LLM / N_SLM, n_c the call's input tokens already
in that tier's prefix cache (its earlier calls in the same trace whose prompt + output the new prompt extends).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from corea.cost import cached_token_cost, flops, token_cost
from corea.protocol import parse_response

TIERS = ("slm", "llm")


@dataclass(frozen=True)
class CostModel:
    """Size ratio for the token cost and parameter counts for FLOPs."""

    ratio: float  # N_LLM / N_SLM
    slm_params: float = 7e9
    llm_params: float = 32e9

    def ratio_of(self, tier: str) -> float:
        return self.ratio if tier == "llm" else 1.0

    def params_of(self, tier: str) -> float:
        return self.llm_params if tier == "llm" else self.slm_params

    def llm_only(self, n_in: int, n_out: int) -> dict[str, float]:
        """The three costs of one uncached LLM answer (the denominator of relative costs)."""
        return {"cost": float(token_cost(n_in, n_out, self.ratio)), "cost_cached": float(token_cost(n_in, n_out, self.ratio)),
                "flops": float(flops(n_in, n_out, self.llm_params))}


@dataclass
class Call:
    tier: str  # "slm" | "llm"
    role: str  # "answer" | "step" | "draft" (an SLM step handed over) | "plan" | "execute"
    prompt_tokens: int
    completion_tokens: int
    text: str
    confidence: float | None = None  # the step's logit confidence, or the verbalized one of an answer
    score: float | None = None  # what the rule compared with tau (posterior, P(call LLM))
    cached_tokens: int = 0
    accepted: bool = True  # its text is part of the final answer
    step: int | None = None

    def costs(self, model: CostModel) -> dict[str, float]:
        r, n = model.ratio_of(self.tier), (self.prompt_tokens, self.completion_tokens)
        return {"cost": float(token_cost(*n, r)),
                "cost_cached": float(cached_token_cost(*n, self.cached_tokens, r)),
                "flops": float(flops(*n, model.params_of(self.tier), self.cached_tokens))}


@dataclass
class Trace:
    strategy: str
    threshold: float | None
    calls: list[Call] = field(default_factory=list)
    text: str = ""  # the final answer
    degraded: bool = False  # the LLM was unavailable and the SLM wrote in its place
    decisions: list = field(default_factory=list, repr=False)  # (features, called the LLM) per step
    _cache: dict[str, list[tuple[str, int]]] = field(default_factory=dict, repr=False)

    def add(self, call: Call, context: str) -> Call:
        """Record ``call`` whose input text is ``context``. Its cached tokens are the longest earlier input, or
        input + output, of the same tier in this trace that ``context`` extends (that tier's prefix cache)."""
        seen = self._cache.setdefault(call.tier, [])
        hits = [n for text, n in seen if context.startswith(text)]
        call.cached_tokens = min(max(hits, default=0), call.prompt_tokens)
        seen += [(context, call.prompt_tokens), (context + call.text, call.prompt_tokens + call.completion_tokens)]
        self.calls.append(call)
        return call

    @property
    def answer(self) -> str | None:
        return parse_response(self.text).answer

    @property
    def confidence(self) -> float | None:
        return parse_response(self.text).confidence

    def costs(self, model: CostModel) -> dict[str, float]:
        out = {"cost": 0.0, "cost_cached": 0.0, "flops": 0.0}
        for c in self.calls:
            for k, v in c.costs(model).items():
                out[k] += v
        return out

    def per_tier(self, model: CostModel) -> dict[str, dict[str, float]]:
        """{tier: prompt_tokens, completion_tokens, calls, cost} for the response's ``corea`` object."""
        out = {t: {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0, "cost": 0.0} for t in TIERS}
        for c in self.calls:
            o = out[c.tier]
            o["prompt_tokens"] += c.prompt_tokens
            o["completion_tokens"] += c.completion_tokens
            o["calls"] += 1
            o["cost"] += c.costs(model)["cost"]
        return out

    @property
    def llm_steps(self) -> int:
        return sum(1 for c in self.calls if c.tier == "llm" and c.accepted)

    def llm_share(self) -> float:
        """Share of the answer's accepted calls written by the LLM."""
        accepted = [c for c in self.calls if c.accepted]
        return sum(c.tier == "llm" for c in accepted) / len(accepted) if accepted else 0.0

    def steps(self) -> list[dict[str, Any]]:
        """The wire form of the trace: ``{"tier", "role", "tokens", "confidence", "accepted"}`` per call."""
        return [{"tier": c.tier, "role": c.role, "tokens": c.completion_tokens, "prompt_tokens": c.prompt_tokens,
                 "confidence": c.confidence, "score": c.score, "accepted": c.accepted} for c in self.calls]

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_") and k != "decisions"}
