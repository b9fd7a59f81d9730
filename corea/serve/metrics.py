"""Prometheus metrics of the cascade ingress.

``GET /metrics`` serves this replica's registry (prometheus_client text format): with one ingress replica that
is the whole application; with several, scrape each replica or turn on ``metrics.ray_export`` so that the same
series are also recorded through Ray's metrics API and aggregated by Ray's Prometheus endpoint.

Series (prometheus_client appends ``_total`` to counters):
    corea_requests{model, tier, outcome}      outcome: ok | degraded | client_error | unavailable | overloaded | error
                                               | cancelled (the client left before the response was complete)
    corea_cascade_decisions{deferred}          cascade-mode requests by routing decision
    corea_deferral_rate                        deferred / decided cascade requests since start
    corea_tokens{tier, kind}                   kind: prompt | completion
    corea_cost{tier}                           paper cost units: n_in + 4 n_out (times the size ratio for the LLM)
    corea_tier_latency_seconds{tier}           one tier call (whole answer or whole stream)
    corea_request_latency_seconds{model, stream}
    corea_slm_confidence                       the SLM's stated confidence; corea_slm_missing_confidence
    corea_strategy_requests{strategy, outcome} step-level / plan-based strategy requests (corea.serve.strategies)
    corea_llm_steps_per_request{strategy}      LLM-written steps (or calls) in one answered request
    corea_strategy_cost{strategy}              paper cost units of those requests, all tiers
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from corea.serve.cascade import CascadeResult

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CONFIDENCE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
try:  # no *_created series: they double the output and nothing here reads them (prometheus_client >= 0.17)
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
except ImportError:
    pass


class _RayMirror:
    """The same series recorded through ``ray.serve.metrics`` (cluster-wide aggregation)."""

    def __init__(self) -> None:
        from ray.serve import metrics as rm

        self.counters = {
            "requests": rm.Counter("corea_requests", "chat completion requests", tag_keys=("model", "tier", "outcome")),
            "decisions": rm.Counter("corea_cascade_decisions", "cascade routing decisions", tag_keys=("deferred",)),
            "tokens": rm.Counter("corea_tokens", "tokens per tier", tag_keys=("tier", "kind")),
            "cost": rm.Counter("corea_cost", "cost in SLM input-token units", tag_keys=("tier",)),
        }
        self.histograms = {
            "tier_latency": rm.Histogram("corea_tier_latency_seconds", "tier call latency",
                                         boundaries=list(LATENCY_BUCKETS), tag_keys=("tier",)),
            "request_latency": rm.Histogram("corea_request_latency_seconds", "request latency",
                                            boundaries=list(LATENCY_BUCKETS), tag_keys=("model", "stream")),
        }

    def inc(self, name: str, value: float, **tags: str) -> None:
        if value:
            self.counters[name].inc(value, tags=tags)

    def observe(self, name: str, value: float, **tags: str) -> None:
        self.histograms[name].observe(value, tags=tags)


class CascadeMetrics:
    """Counters and histograms of one ingress replica."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, ray_export: bool = False) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("corea_requests", "Chat completion requests", ["model", "tier", "outcome"], registry=r)
        self.decisions = Counter("corea_cascade_decisions", "Cascade routing decisions", ["deferred"], registry=r)
        self.deferral_rate = Gauge("corea_deferral_rate", "Deferred share of cascade decisions since start",
                                   registry=r)
        self.tokens = Counter("corea_tokens", "Tokens processed per tier", ["tier", "kind"], registry=r)
        self.cost = Counter("corea_cost", "Cost in SLM input-token units (n_in + 4 n_out, times the size ratio "
                                          "for the LLM)", ["tier"], registry=r)
        self.tier_latency = Histogram("corea_tier_latency_seconds", "Latency of one tier call", ["tier"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram("corea_request_latency_seconds", "Latency of one request",
                                         ["model", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.confidence = Histogram("corea_slm_confidence", "The SLM's stated confidence",
                                    buckets=CONFIDENCE_BUCKETS, registry=r)
        self.missing_confidence = Counter("corea_slm_missing_confidence", "SLM answers without a valid confidence",
                                          registry=r)
        self.strategy_requests = Counter("corea_strategy_requests", "Strategy requests", ["strategy", "outcome"],
                                         registry=r)
        self.llm_steps = Histogram("corea_llm_steps_per_request", "LLM-written steps per request", ["strategy"],
                                   buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.strategy_cost = Counter("corea_strategy_cost", "Cost in SLM input-token units per strategy",
                                     ["strategy"], registry=r)
        self._decided = [0, 0]  # [answered by the SLM, deferred]
        self._ray = _RayMirror() if ray_export else None

    def record(self, result: CascadeResult, latency_s: float, stream: bool) -> None:
        """Account for one answered request."""
        outcome = "degraded" if result.degraded else "ok"
        self.requests.labels(result.model, result.tier, outcome).inc()
        self.request_latency.labels(result.model, str(stream).lower()).observe(latency_s)
        if result.mode == "cascade":
            self.decisions.labels(str(result.deferred).lower()).inc()
            self._decided[int(result.deferred)] += 1
            self.deferral_rate.set(self._decided[1] / sum(self._decided))
        if result.slm is not None:
            if result.confidence is None:
                self.missing_confidence.inc()
            else:
                self.confidence.observe(result.confidence)
        for answer in (result.slm, result.llm):
            if answer is None:
                continue
            self.tokens.labels(answer.tier, "prompt").inc(answer.prompt_tokens)
            self.tokens.labels(answer.tier, "completion").inc(answer.completion_tokens)
            self.cost.labels(answer.tier).inc(answer.cost)
            self.tier_latency.labels(answer.tier).observe(answer.latency_s)
        if self._ray is not None:
            self._mirror(result, outcome, latency_s, stream)

    def _mirror(self, result: CascadeResult, outcome: str, latency_s: float, stream: bool) -> None:
        ray = self._ray
        ray.inc("requests", 1, model=result.model, tier=result.tier, outcome=outcome)
        ray.observe("request_latency", latency_s, model=result.model, stream=str(stream).lower())
        if result.mode == "cascade":
            ray.inc("decisions", 1, deferred=str(result.deferred).lower())
        for answer in (result.slm, result.llm):
            if answer is not None:
                ray.inc("tokens", answer.prompt_tokens, tier=answer.tier, kind="prompt")
                ray.inc("tokens", answer.completion_tokens, tier=answer.tier, kind="completion")
                ray.inc("cost", answer.cost, tier=answer.tier)
                ray.observe("tier_latency", answer.latency_s, tier=answer.tier)

    def record_strategy(self, model: str, strategy: str, per_tier: dict[str, dict], cost: float, llm_steps: int,
                        degraded: bool, latency_s: float, stream: bool) -> None:
        """Account for one answered step-level / plan-based request (``per_tier``: tokens and cost per tier)."""
        outcome = "degraded" if degraded else "ok"
        self.requests.labels(model, strategy, outcome).inc()
        self.request_latency.labels(model, str(stream).lower()).observe(latency_s)
        self.strategy_requests.labels(strategy, outcome).inc()
        self.llm_steps.labels(strategy).observe(llm_steps)
        self.strategy_cost.labels(strategy).inc(cost)
        for tier, t in per_tier.items():
            self.tokens.labels(tier, "prompt").inc(t["prompt_tokens"])
            self.tokens.labels(tier, "completion").inc(t["completion_tokens"])
            self.cost.labels(tier).inc(t["cost"])
        if self._ray is not None:
            self._ray.inc("requests", 1, model=model, tier=strategy, outcome=outcome)

    def failure(self, model: str, outcome: str) -> None:
        """Account for a request that got an error response."""
        self.requests.labels(model or "unknown", "none", outcome).inc()
        if self._ray is not None:
            self._ray.inc("requests", 1, model=model or "unknown", tier="none", outcome=outcome)

    def render(self) -> bytes:
        return generate_latest(self.registry)
