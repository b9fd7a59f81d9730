"""The four strategies as async drivers over ``Tiers``: one code path for evaluation and serving.

Each returns a ``Trace`` (every call, kept whole; the final answer in ``trace.text``). ``on_step(text)`` is
awaited with each piece of the answer as soon as it is accepted (serving streams it). When the LLM is
unavailable mid-trace, ``TierUnavailable`` propagates, or with ``degrade_to_slm`` the SLM's own text is used and
``trace.degraded`` is set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np

from corea.collab import STRATEGIES
from corea.collab.mixture import StepMixture
from corea.collab.policy import StepPolicy, step_features
from corea.collab.prompts import execute_messages, plan_messages
from corea.collab.rules import cope_escalates, defers, policy_calls_llm, step_confidence, steer_calls_llm
from corea.collab.steps import STEP_END
from corea.collab.tiers import Output, Tiers, TierUnavailable, step_params
from corea.collab.trace import Call, Trace
from corea.protocol import parse_response

OnStep = Callable[[str], Awaitable[None]]


@dataclass
class Settings:
    """Per-strategy settings; ``threshold`` is tau of the strategy's rule."""

    threshold: float = 0.5
    max_steps: int = 16
    max_step_tokens: int = 64
    aggregate: str = "min"  # step confidence over the drafted step: see rules.step_confidence
    lookahead: int | None = None  # tokens of the draft read (None: the whole step)
    mixture: StepMixture | None = None  # steer; None maps a confidence to itself
    policy: StepPolicy | None = None  # stepwise_policy
    degrade_to_slm: bool = False


def _context(messages, prefix: str = "") -> str:
    return json.dumps(messages, sort_keys=True) + "\x00" + prefix


def _call(tier: str, role: str, out: Output, **kw) -> Call:
    return Call(tier, role, out.prompt_tokens, out.completion_tokens, out.text, **kw)


async def _emit(on_step: OnStep | None, text: str) -> None:
    if on_step is not None and text:
        await on_step(text)


async def cascade(tiers: Tiers, messages, params, s: Settings, on_step: OnStep | None = None) -> Trace:
    trace = Trace("cascade", s.threshold)
    slm = await tiers.answer("slm", messages, params)
    c = parse_response(slm.text).confidence
    first = trace.add(_call("slm", "answer", slm, confidence=c, score=c), _context(messages))
    trace.text = slm.text
    if defers(c, s.threshold):
        try:
            llm = await tiers.answer("llm", messages, params)
            first.accepted = False
            trace.add(_call("llm", "answer", llm), _context(messages))
            trace.text = llm.text
        except TierUnavailable:
            if not s.degrade_to_slm:
                raise
            trace.degraded = True
    await _emit(on_step, trace.text)
    return trace


def _is_last(out: Output) -> bool:
    """The answer ends with this step: it holds the final box or confidence, or the model stopped (EOS)."""
    return ("\\boxed{" in out.text or "\\confidence{" in out.text
            or (out.finish_reason == "stop" and not out.text.endswith(STEP_END)))


async def stepwise(tiers: Tiers, messages, params, s: Settings, name: str,
                   decide: Callable[[float, np.ndarray], tuple[bool, float]], on_step: OnStep | None = None) -> Trace:
    """The step loop shared by steer and stepwise_policy: the SLM drafts a step; ``decide(confidence,
    features)`` -> (call the LLM, score); if so the LLM writes that step from the same prefix instead."""
    trace = Trace(name, s.threshold)
    sp = step_params(params, s.max_step_tokens)
    budget = int(params.get("max_tokens", s.max_steps * s.max_step_tokens))
    prefix, prev_llm, written = "", False, 0
    for i in range(s.max_steps):
        ctx = _context(messages, prefix)
        draft = await tiers.step("slm", messages, prefix, sp)
        conf = step_confidence(draft.token_probs, s.aggregate, s.lookahead)
        feats = step_features(draft.token_probs, i, draft.prompt_tokens, prev_llm)
        use_llm, score = decide(conf, feats)
        call = trace.add(_call("slm", "step", draft, confidence=conf, score=score, step=i), ctx)
        trace.decisions.append((feats, use_llm))
        out = draft
        if use_llm:
            try:
                out = await tiers.step("llm", messages, prefix, sp)
                call.accepted, call.role = False, "draft"
                trace.add(_call("llm", "step", out, step=i), ctx)
            except TierUnavailable:
                if not s.degrade_to_slm:
                    raise
                trace.degraded, out = True, draft
        prefix += out.text
        written += out.completion_tokens
        prev_llm = trace.calls[-1].tier == "llm"
        await _emit(on_step, out.text)
        if _is_last(out) or written >= budget:
            break
    trace.text = prefix
    return trace


async def steer(tiers: Tiers, messages, params, s: Settings, on_step: OnStep | None = None) -> Trace:
    def decide(conf: float, _feats) -> tuple[bool, float]:
        post = s.mixture.posterior(conf) if s.mixture is not None else conf
        return steer_calls_llm(post, s.threshold), float(post)

    return await stepwise(tiers, messages, params, s, "steer", decide, on_step)


async def stepwise_policy(tiers: Tiers, messages, params, s: Settings, on_step: OnStep | None = None,
                          explore: np.random.Generator | None = None) -> Trace:
    """With ``explore`` (training), the action is sampled from Bernoulli(P(call LLM)); else the threshold rule."""
    if s.policy is None:
        raise ValueError("stepwise_policy needs a trained policy (Settings.policy)")

    def decide(_conf: float, feats: np.ndarray) -> tuple[bool, float]:
        p = s.policy.prob(feats)
        if explore is not None:
            return bool(explore.random() < p), p
        return policy_calls_llm(p, s.threshold), p

    return await stepwise(tiers, messages, params, s, "stepwise_policy", decide, on_step)


#: COPE's stages: (planner, executor).
COPE_STAGES = (("slm", "slm"), ("llm", "slm"), ("llm", "llm"))


async def cope(tiers: Tiers, messages, params, s: Settings, on_step: OnStep | None = None) -> Trace:
    """Stage k runs when stage k-1's verbalized executor confidence is below tau; stage 3 reuses stage 2's
    plan. The stage confidence is the executor's verbalized one (one sample, the quantity RLCC calibrates)."""
    trace = Trace("cope", s.threshold)
    plans: dict[str, str] = {}
    last_exec: Call | None = None
    for k, (planner, executor) in enumerate(COPE_STAGES):
        try:
            if planner not in plans:
                pm = plan_messages(messages)
                plan = await tiers.answer(planner, pm, params)
                trace.add(_call(planner, "plan", plan, step=k), _context(pm))
                plans[planner] = plan.text.strip()
            em = execute_messages(messages, plans[planner])
            out = await tiers.answer(executor, em, params)
        except TierUnavailable:
            if "llm" not in (planner, executor) or not s.degrade_to_slm or last_exec is None:
                raise
            trace.degraded = True
            break
        c = parse_response(out.text).confidence
        if last_exec is not None:
            last_exec.accepted = False
        last_exec = trace.add(_call(executor, "execute", out, confidence=c, score=c, step=k), _context(em))
        trace.text = out.text
        if not cope_escalates(c, s.threshold):
            break
    planner_used = COPE_STAGES[last_exec.step][0] if last_exec is not None else None
    for call in trace.calls:  # the plan behind the accepted execution is part of the answer
        if call.role == "plan":
            call.accepted = call.tier == planner_used
    await _emit(on_step, trace.text)
    return trace


DRIVERS: dict[str, Callable[..., Awaitable[Trace]]] = {"cascade": cascade, "steer": steer,
                                                         "stepwise_policy": stepwise_policy, "cope": cope}
assert tuple(DRIVERS) == STRATEGIES


async def run(strategy: str, tiers: Tiers, messages, params: dict[str, Any], s: Settings,
              on_step: OnStep | None = None) -> Trace:
    if strategy not in DRIVERS:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return await DRIVERS[strategy](tiers, messages, params, s, on_step=on_step)
