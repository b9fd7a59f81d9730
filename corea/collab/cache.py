"""Generation cache over ``Tiers``: one engine call per distinct (tier, kind, messages, prefix, sampling settings).

Exact only when a call's output is a function of its input: greedy decoding (temperature 0), or a seeded request
(``params["seed"]``), which the engines sample from a stream derived from (seed, prompt token ids, sample index)
alone (``corea.engines.hf.sample_seed``; vLLM seeds each request's generator the same way). Unseeded sampling
is passed through uncached. Stepwise strategies revisit the same prefixes across thresholds, policy samples
and training iterations, so a sweep or a training run pays for each distinct step once.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from corea.collab.tiers import Output, Tiers


def deterministic(params: dict[str, Any]) -> bool:
    """Whether a call with ``params`` always gives the same output: seeded, or greedy."""
    return params.get("seed") is not None or float(params.get("temperature", 1.0)) == 0.0


def _params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


class CachedTiers:
    """``Tiers`` that memoize deterministic calls of ``inner``; concurrent identical calls share one call.

    ``inner`` is a ``Tiers`` object or a factory of them: with a factory each event loop gets its own (the
    micro-batchers of ``EngineTiers`` belong to the loop that made them, and each ``asyncio.run`` is a new
    loop), while the cache outlives them all. ``hits`` / ``misses`` count the calls answered from the cache /
    passed on; ``engine_s`` sums the inner tiers' engine seconds."""

    def __init__(self, inner: Tiers | Callable[[], Tiers]) -> None:
        self._factory = None if hasattr(inner, "step") else inner
        self._inner = inner if self._factory is None else None
        self._inner_loop: asyncio.AbstractEventLoop | None = None
        self._engine_s = 0.0
        self._done: dict[tuple, Output] = {}
        self._pending: dict[tuple, asyncio.Future] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._done)

    @property
    def inner(self) -> Tiers:
        """The tiers of the running event loop (made on first use in a loop when ``inner`` is a factory)."""
        if self._factory is not None:
            loop = asyncio.get_running_loop()
            if self._inner is None or self._inner_loop is not loop:
                self._engine_s += float(getattr(self._inner, "engine_s", 0.0))
                self._inner, self._inner_loop = self._factory(), loop
        return self._inner

    @property
    def engine_s(self) -> float:
        return self._engine_s + float(getattr(self._inner, "engine_s", 0.0))

    async def _get(self, key: tuple, make) -> Output:
        if key in self._done:
            self.hits += 1
            return self._done[key]
        loop = asyncio.get_running_loop()
        fut = self._pending.get(key)
        if fut is not None and fut.get_loop() is loop:
            self.hits += 1
            return await asyncio.shield(fut)
        self.misses += 1
        fut = loop.create_future()
        self._pending[key] = fut
        try:
            out = await make()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._pending.pop(key, None)
        self._done[key] = out
        fut.set_result(out)
        return out

    async def answer(self, tier: str, messages, params) -> Output:
        if not deterministic(params):
            return await self.inner.answer(tier, messages, params)
        key = ("answer", tier, json.dumps(messages, sort_keys=True), "", _params_key(params))
        return await self._get(key, lambda: self.inner.answer(tier, messages, params))

    async def step(self, tier: str, messages, prefix: str, params) -> Output:
        if not deterministic(params):
            return await self.inner.step(tier, messages, prefix, params)
        key = ("step", tier, json.dumps(messages, sort_keys=True), prefix, _params_key(params))
        return await self._get(key, lambda: self.inner.step(tier, messages, prefix, params))
