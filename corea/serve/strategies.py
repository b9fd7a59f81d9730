"""Step-level and plan-based strategies behind the OpenAI API: the ingress drives the SLM and LLM deployments
through their handles with ``corea.collab.strategies`` (the rules evaluation runs).

A request selects a strategy with ``corea: {"strategy": ..., "threshold": ...}`` or with a model id from
``strategies.model_ids``; the default model id uses ``strategies.default``. The response's ``corea`` object holds
``strategy``, ``threshold``, ``trace`` (one ``{"tier", "role", "tokens", "prompt_tokens", "confidence", "score",
"accepted"}`` per call), tokens and cost per tier, LLM steps, ``degraded``, and the routing overhead (request
time not spent in the tiers' engines); the sums travel in ``x-corea-*`` headers. With ``stream: true`` each
accepted step is sent as one chunk as soon as the rule has accepted it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from corea.collab.mixture import StepMixture
from corea.collab.policy import StepPolicy
from corea.collab.strategies import Settings, run
from corea.collab.tiers import Output, TierRejected, TierUnavailable
from corea.collab.trace import CostModel, Trace
from corea.serve.openai_schema import ApiError, chunk_body, completion_body, error_body, new_id, sse, usage_body

log = logging.getLogger(__name__)
STEP_STRATEGIES = ("steer", "stepwise_policy", "cope")


class HandleTiers:
    """``corea.collab.tiers.Tiers`` over the deployments' handles (``deployments.HandleTier``), timing each call's
    engine time so that the routing overhead can be reported."""

    def __init__(self, slm, llm, timeouts: dict[str, float]) -> None:
        self.tiers, self.timeouts, self.engine_s = {"slm": slm, "llm": llm}, timeouts, 0.0

    def _tier(self, tier: str):
        if self.tiers.get(tier) is None:
            raise TierUnavailable(tier, "not deployed in this application")
        return self.tiers[tier]

    async def _bounded(self, tier: str, call):
        try:
            return await asyncio.wait_for(call, self.timeouts[tier])
        except asyncio.TimeoutError:
            raise TierUnavailable(tier, f"no answer within {self.timeouts[tier]:g} s") from None

    async def answer(self, tier, messages, params) -> Output:
        start = time.perf_counter()
        out = await self._bounded(tier, self._tier(tier).generate(messages, params))
        self.engine_s += time.perf_counter() - start  # whole-answer calls: no engine time reported, count all
        return Output.of(out)

    async def step(self, tier, messages, prefix, params) -> Output:
        out = await self._bounded(tier, self._tier(tier).continue_step(messages, prefix, params))
        self.engine_s += float(out.get("gen_s", 0.0))
        return Output.of(out)


class StrategyServer:
    """Answers chat requests with one of the step-level / plan-based strategies."""

    def __init__(self, slm, llm, cfg, metrics) -> None:
        st = cfg.strategies
        self.cfg, self.metrics, self.slm, self.llm = st, metrics, slm, llm
        self.cost_model = CostModel(cfg.cascade.cost_ratio)
        self.timeouts = {"slm": cfg.limits.slm_timeout_s, "llm": cfg.limits.llm_timeout_s}
        mixture = StepMixture.from_json(Path(st.mixture_path).read_text()) if st.mixture_path else None
        self.policy = StepPolicy.from_json(Path(st.policy_path).read_text()) if st.policy_path else None
        self.base = Settings(max_steps=st.max_steps, max_step_tokens=st.max_step_tokens, aggregate=st.aggregate,
                             lookahead=st.lookahead, mixture=mixture, policy=self.policy,
                             degrade_to_slm=cfg.cascade.degrade_to_slm)
        self.default = st.default

    def selects(self, mode: str, requested: str | None) -> bool:
        """Whether this request is for a step-level / plan-based strategy (else the cascade answers it)."""
        return self.strategy(mode, requested) in STEP_STRATEGIES

    def strategy(self, mode: str, requested: str | None) -> str:
        return requested or (mode if mode in STEP_STRATEGIES else self.default)

    def settings(self, strategy: str, threshold: float | None) -> Settings:
        if strategy == "stepwise_policy" and self.policy is None:
            raise ApiError(400, "stepwise_policy is not configured here: set strategies.policy_path to a StepPolicy "
                           "JSON. `corea eval --config <eval.yaml>` with a `strategies` section naming "
                           "stepwise_policy trains one and writes it to <output_dir>/strategies/stepwise_policy.json "
                           "(with steer_mixture.json and strategies.json, the calibrated thresholds, beside it)", param="corea.strategy")
        tau = self.cfg.thresholds.get(strategy, 0.5) if threshold is None else threshold
        from dataclasses import replace

        return replace(self.base, threshold=float(tau))

    def meta(self, trace: Trace, wall_s: float, engine_s: float) -> dict[str, Any]:
        per = trace.per_tier(self.cost_model)
        costs = trace.costs(self.cost_model)
        handoffs = sum(1 for a, b in zip(trace.calls, trace.calls[1:]) if a.tier != b.tier)
        return {"strategy": trace.strategy, "threshold": trace.threshold, "trace": trace.steps(),
                "answer": trace.answer, "confidence": trace.confidence, "degraded": trace.degraded,
                "llm_steps": trace.llm_steps, "handoffs": handoffs,
                "usage": {t: {"prompt_tokens": v["prompt_tokens"], "completion_tokens": v["completion_tokens"]}
                          for t, v in per.items()},
                "cost": {"slm": per["slm"]["cost"], "llm": per["llm"]["cost"], "total": costs["cost"],
                         "total_cached": costs["cost_cached"]},
                "latency_ms": {"total": round(1000 * wall_s, 3), "engines": round(1000 * engine_s, 3),
                               "routing_overhead": round(1000 * (wall_s - engine_s), 3)}}

    @staticmethod
    def headers(meta: dict[str, Any]) -> dict[str, str]:
        u = meta["usage"]
        return {"x-corea-strategy": meta["strategy"], "x-corea-threshold": f"{meta['threshold']:g}",
                "x-corea-llm-steps": str(meta["llm_steps"]), "x-corea-calls": str(len(meta["trace"])),
                "x-corea-slm-tokens": str(u["slm"]["prompt_tokens"] + u["slm"]["completion_tokens"]),
                "x-corea-llm-tokens": str(u["llm"]["prompt_tokens"] + u["llm"]["completion_tokens"]),
                "x-corea-cost": f"{meta['cost']['total']:.1f}", "x-corea-degraded": str(meta["degraded"]).lower()}

    def _usage(self, meta) -> dict[str, int]:
        u = meta["usage"]
        return usage_body(u["slm"]["prompt_tokens"] + u["llm"]["prompt_tokens"],
                          u["slm"]["completion_tokens"] + u["llm"]["completion_tokens"])

    def _account(self, model, meta, wall_s, stream: bool) -> None:
        per = {t: {**v, "cost": meta["cost"][t]} for t, v in meta["usage"].items()}
        self.metrics.record_strategy(model, meta["strategy"], per, meta["cost"]["total"], meta["llm_steps"],
                                     meta["degraded"], wall_s, stream)

    async def respond(self, req, messages, params, mode: str, model: str, start: float):
        strategy = self.strategy(mode, req.corea.strategy)
        s = self.settings(strategy, req.corea.threshold)
        tiers = HandleTiers(self.slm, self.llm, self.timeouts)
        if not req.stream:
            trace = await run(strategy, tiers, messages, params, s)
            wall = time.perf_counter() - start
            meta = self.meta(trace, wall, tiers.engine_s)
            self._account(model, meta, wall, stream=False)
            body = completion_body(new_id(), model, trace.text, "stop", self._usage(meta), meta)
            return JSONResponse(body, headers=self.headers(meta))
        return await self._stream(strategy, s, tiers, messages, params, model, start,
                                  bool(req.stream_options and req.stream_options.include_usage))

    async def _stream(self, strategy, s, tiers, messages, params, model, start, include_usage):
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def on_step(text: str) -> None:
            await queue.put(text)

        async def work() -> None:
            try:
                await queue.put(await run(strategy, tiers, messages, params, s, on_step=on_step))
            except BaseException as exc:  # handed to the response
                await queue.put(exc)
            finally:
                await queue.put(done)

        task = asyncio.create_task(work())
        first = await queue.get()  # an error before the first step is a plain HTTP error
        if isinstance(first, BaseException):
            task.cancel()
            raise first
        rid, created = new_id(), int(time.time())

        async def events():
            yield sse(chunk_body(rid, model, created, {"role": "assistant", "content": ""}))
            item = first
            try:
                while item is not done:
                    if isinstance(item, (TierUnavailable, TierRejected)):
                        unavailable = isinstance(item, TierUnavailable)
                        self.metrics.failure(model, "unavailable" if unavailable else "client_error")
                        yield sse(error_body(str(item), "service_unavailable" if unavailable else
                                             "invalid_request_error", code="tier_unavailable" if unavailable else None))
                        break
                    if isinstance(item, BaseException):
                        log.error("strategy %s failed mid-stream: %r", strategy, item)
                        yield sse(error_body("internal error", "server_error"))
                        break
                    if isinstance(item, Trace):
                        wall = time.perf_counter() - start
                        meta = self.meta(item, wall, tiers.engine_s)
                        self._account(model, meta, wall, stream=True)
                        yield sse(chunk_body(rid, model, created, {}, "stop", corea=meta))
                        if include_usage:
                            yield sse(chunk_body(rid, model, created, usage=self._usage(meta)))
                    else:
                        yield sse(chunk_body(rid, model, created, {"content": item}))
                    item = await queue.get()
                yield sse("[DONE]")
            finally:
                if not task.done():
                    task.cancel()

        headers = {"x-corea-strategy": strategy, "x-corea-threshold": f"{s.threshold:g}", "cache-control": "no-cache"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
