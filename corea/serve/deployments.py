"""The Ray Serve deployments: model tiers (SLM, LLM), the cascade ingress, and a standalone SLM ingress.

    CascadeIngress.bind(SLM.bind(slm_cfg, "slm", work_dir), LLM.bind(llm_cfg, "llm", work_dir), cfg)

A tier replica holds one engine (transformers on CPU/GPU, vLLM with tensor parallelism on GPU). Concurrent
requests with the same sampling settings are micro-batched into one ``engine.generate`` call when
``batching.max_batch_size`` > 1; vLLM configs set it to 1 and let vLLM batch continuously. The ingress
replicas run the FastAPI app of ``corea.serve.ingress`` and call the tiers through deployment handles.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from ray import serve

from corea.collab.batching import MicroBatcher
from corea.collab.tiers import sampling_params
from corea.engines.base import EngineInputError, EngineUnavailable
from corea.serve.cascade import Cascade, TierOverloaded, TierRejected, TierUnavailable
from corea.serve.config import ServeConfig, TierConfig
from corea.serve.ingress import IngressSettings, create_app
from corea.serve.metrics import CascadeMetrics

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 2.0


def _params_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


class TierServer:
    """One model tier: an engine plus ``generate`` / ``stream`` / ``info`` for the ingress."""

    def __init__(self, tier: dict[str, Any], role: str, work_dir: str, max_prompt_tokens: int | None = None) -> None:
        from corea.engines import load_engine
        from corea.serve.tiny import resolve_tier_model

        self.cfg = TierConfig.model_validate(tier)
        self.role = role
        self.max_prompt_tokens = max_prompt_tokens
        if self.cfg.torch_threads:
            import torch

            torch.set_num_threads(self.cfg.torch_threads)
        self.model_path = resolve_tier_model(self.cfg.model, work_dir, self.cfg.model_seed)
        self.engine = load_engine(self.model_path, self.cfg.backend, **self.cfg.load_options())
        self.max_model_len = getattr(self.engine, "max_model_len", None)
        self._pool = ThreadPoolExecutor(max_workers=self.cfg.max_ongoing_requests, thread_name_prefix=f"corea-{role}")
        batching = self.cfg.batching
        self._batcher = None
        if batching.max_batch_size > 1:
            self._batcher = MicroBatcher(self._generate_batch, batching.max_batch_size, batching.batch_wait_timeout_s)
        log.info("%s tier ready: %s (%s)", role, self.model_path, self.cfg.backend)

    def info(self) -> dict[str, Any]:
        """What the replica serves; with vLLM, also the requests its engine holds (waiting or running)."""
        info = {"role": self.role, "model": self.model_path, "backend": self.cfg.backend}
        if hasattr(self.engine, "num_unfinished_requests"):
            info["unfinished_requests"] = self.engine.num_unfinished_requests()
        return info

    def _check(self, messages: list[dict[str, str]], params: dict[str, Any]):
        """SamplingParams and prompt token count; ValueError (``EngineInputError`` for the prompt) when the model
        cannot take the request: untokenizable, over ``max_prompt_tokens``, or over the context."""
        sampling = sampling_params(params)
        n_in = len(self.engine.encode(messages))
        if self.max_prompt_tokens and n_in > self.max_prompt_tokens:
            raise EngineInputError(f"the prompt has {n_in} tokens; at most {self.max_prompt_tokens} are allowed")
        if self.max_model_len and n_in + sampling.max_tokens > self.max_model_len:
            raise EngineInputError(f"the prompt ({n_in} tokens) plus max_tokens ({sampling.max_tokens}) exceeds the "
                             f"model's context of {self.max_model_len} tokens")
        return sampling, n_in

    def _run(self, prompts: list, sampling) -> list[dict[str, Any]]:
        return self._outputs(self.engine.generate(prompts, sampling))

    @staticmethod
    def _outputs(generations) -> list[dict[str, Any]]:
        out = []
        for gen in generations:
            sample = gen.samples[0]
            out.append({"text": sample.text, "prompt_tokens": gen.prompt_tokens,
                        "completion_tokens": sample.output_tokens, "finish_reason": sample.finish_reason})
        return out

    async def generate(self, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
        """One whole answer, or ``{"error": message}`` for a request the model cannot take."""
        try:
            sampling, _ = self._check(messages, params)
        except ValueError as exc:
            return {"error": str(exc)}
        if self._batcher is not None:
            return await self._batcher.submit((messages, params))
        return await self.generate_one(messages, sampling)

    async def _generate_batch(self, items: list[tuple[list, dict]]) -> list[dict[str, Any]]:
        """Requests sharing sampling settings go through the engine together; a failing group is retried one
        request at a time so that only the failing request gets the error."""
        loop = asyncio.get_running_loop()
        groups: dict[tuple, list[int]] = {}
        for i, (_, params) in enumerate(items):
            groups.setdefault(_params_key(params), []).append(i)
        results: list[dict[str, Any] | None] = [None] * len(items)
        for indices in groups.values():
            sampling = sampling_params(items[indices[0]][1])
            try:
                outs = await loop.run_in_executor(self._pool, self._run, [items[i][0] for i in indices], sampling)
            except EngineInputError as exc:
                if len(indices) == 1:
                    outs = [{"error": str(exc)}]
                else:
                    outs = [await self.generate_one(items[i][0], sampling) for i in indices]
            for i, out in zip(indices, outs):
                results[i] = out
        return results

    async def generate_one(self, messages, sampling) -> dict[str, Any]:
        """One request; on an engine with ``agenerate`` (vLLM) awaited on the engine itself, so that a cancelled
        request (client gone, cascade timeout) is aborted inside the engine, not decoded to ``max_tokens``."""
        try:
            if hasattr(self.engine, "agenerate"):
                return self._outputs(await self.engine.agenerate([messages], sampling))[0]
            return (await asyncio.get_running_loop().run_in_executor(self._pool, self._run, [messages], sampling))[0]
        except EngineInputError as exc:
            return {"error": str(exc)}

    def check_health(self) -> None:
        """Serve's health check: raises when the engine can no longer serve (e.g. vLLM's engine process died),
        so that Serve replaces this replica."""
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            check()

    def _continue(self, messages, prefix: str, params: dict[str, Any]) -> dict[str, Any]:
        import time as _time

        from corea.collab.tiers import to_output

        start = _time.perf_counter()
        try:  # the engine rejects a prompt + prefix + max_tokens longer than the model's context
            out = to_output(self.engine.continue_prompts([(messages, prefix)], sampling_params(params))[0])
        except ValueError as exc:
            return {"error": str(exc)}
        return {**out, "gen_s": _time.perf_counter() - start}

    async def continue_step(self, messages: list[dict[str, str]], prefix: str, params: dict[str, Any]
                            ) -> dict[str, Any]:
        """Continue the assistant message after ``prefix`` (one step, up to ``stop``), with each token's
        probability and the engine time ``gen_s``; ``{"error": message}`` for a request the model cannot take
        (checked as ``generate`` checks it: ``max_prompt_tokens``, prompt + ``max_tokens`` within the context).
        With ``params["check_only"]``, only that check: ``{"prompt_tokens": n}`` (``cascade.check_prompt``)."""
        try:
            _, n_in = self._check(messages, params)
        except ValueError as exc:
            return {"error": str(exc)}
        if params.get("check_only"):
            return {"prompt_tokens": n_in}
        if hasattr(self.engine, "acontinue_prompts"):  # cancellable inside the engine, as generate_one
            return await self._acontinue(messages, prefix, params)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._continue, messages, prefix, params)

    async def _acontinue(self, messages, prefix: str, params: dict[str, Any]) -> dict[str, Any]:
        import time as _time

        from corea.collab.tiers import to_output

        start = _time.perf_counter()
        try:
            gens = await self.engine.acontinue_prompts([(messages, prefix)], sampling_params(params))
        except ValueError as exc:
            return {"error": str(exc)}
        return {**to_output(gens[0]), "gen_s": _time.perf_counter() - start}

    async def stream(self, messages: list[dict[str, str]], params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """``{"delta": text}`` items, then ``{"usage", "finish_reason"}``. Completion tokens are counted by
        re-tokenizing the streamed text (plus the end-of-sequence token when it stopped on its own)."""
        try:
            sampling, n_in = self._check(messages, params)
        except ValueError as exc:
            yield {"error": str(exc)}
            return
        parts = []
        async for delta in self.engine.stream(messages, sampling):
            parts.append(delta)
            yield {"delta": delta}
        n_out = len(self.engine.tokenizer("".join(parts), add_special_tokens=False)["input_ids"])
        finish = "length" if n_out >= sampling.max_tokens else "stop"
        n_out = min(n_out + (finish == "stop"), sampling.max_tokens)
        yield {"usage": {"prompt_tokens": n_in, "completion_tokens": n_out}, "finish_reason": finish}


def tier_error(tier: str, exc: BaseException) -> Exception:
    """What a failed handle call means for the client, without internals in the message: the replica's
    ``EngineInputError`` (also inside a ``RayTaskError``) is a client error (``TierRejected``); a full queue
    (Serve's ``BackPressureError``) is ``TierOverloaded``; a dead or unreachable replica is ``TierUnavailable``;
    any other error raised in the replica is an internal error (returned as is: HTTP 500)."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else exc
    if isinstance(cause, EngineUnavailable):  # the replica's engine died; Serve's health check replaces it
        log.warning("%s tier engine unavailable: %s", tier, _reason(cause))
        return TierUnavailable(tier, "its engine is restarting")
    if isinstance(cause, EngineInputError) or isinstance(exc, EngineInputError):
        return TierRejected(str(cause if isinstance(cause, EngineInputError) else exc.args[0]))
    if isinstance(exc, BackPressureError) or isinstance(cause, BackPressureError):
        return TierOverloaded(tier, "its request queue is full")
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)) or isinstance(cause, RayActorError):
        log.warning("%s tier call failed: %s", tier, _reason(exc))
        return TierUnavailable(tier, "no replica could answer")
    if isinstance(exc, RayTaskError):
        log.error("%s tier raised: %s", tier, exc)
        return RuntimeError(f"the {tier} tier failed on this request")
    log.warning("%s tier call failed: %s", tier, _reason(exc))
    return TierUnavailable(tier, "no replica could answer")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1][:300] if text else ''}".rstrip(": ")


class HandleTier:
    """A tier reached through a Serve deployment handle; failures are mapped by ``tier_error``."""

    def __init__(self, handle, tier: str) -> None:
        self.handle, self.tier = handle, tier

    async def _call(self, method: str, *args) -> dict[str, Any]:
        response = getattr(self.handle, method).remote(*args)
        try:
            out = await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:
            raise tier_error(self.tier, exc) from None
        if "error" in out:
            raise TierRejected(out["error"])
        return out

    async def generate(self, messages, params) -> dict[str, Any]:
        return await self._call("generate", messages, params)

    async def continue_step(self, messages, prefix: str, params) -> dict[str, Any]:
        return await self._call("continue_step", messages, prefix, params)

    async def stream(self, messages, params) -> AsyncIterator[dict[str, Any]]:
        generator = self.handle.options(stream=True).stream.remote(messages, params)
        finished = False
        try:
            async for item in generator:
                if "error" in item:
                    raise TierRejected(item["error"])
                yield item
            finished = True
        except (TierRejected, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise tier_error(self.tier, exc) from None
        finally:
            if not finished:
                generator.cancel()

    async def probe(self) -> str:
        try:
            await asyncio.wait_for(self.handle.info.remote(), PROBE_TIMEOUT_S)
            return "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means unavailable
            return f"unavailable ({type(exc).__name__})"


class LocalTier:
    """A tier in this very process (the standalone SLM ingress)."""

    def __init__(self, server: TierServer) -> None:
        self.server = server

    async def generate(self, messages, params) -> dict[str, Any]:
        out = await self.server.generate(messages, params)
        if "error" in out:
            raise TierRejected(out["error"])
        return out

    async def stream(self, messages, params) -> AsyncIterator[dict[str, Any]]:
        async for item in self.server.stream(messages, params):
            if "error" in item:
                raise TierRejected(item["error"])
            yield item


def _cascade(cfg: ServeConfig, slm, llm) -> Cascade:
    return Cascade(slm, llm, cfg.cascade.cost_ratio, cfg.cascade.degrade_to_slm, cfg.limits.slm_timeout_s,
                   cfg.limits.llm_timeout_s)


class _CascadeIngress:
    """HTTP ingress of the cascade (FastAPI app built per replica by ``__serve_build_asgi_app__``)."""

    def __init__(self, slm, llm, config: dict[str, Any]) -> None:
        cfg = ServeConfig.model_validate(config)
        self.tiers = {"slm": HandleTier(slm, "slm"), "llm": HandleTier(llm, "llm") if llm is not None else None}
        self.cascade = _cascade(cfg, self.tiers["slm"], self.tiers["llm"])
        self.settings = IngressSettings.from_config(cfg, cfg.auth.api_key_sha256)
        self.metrics = CascadeMetrics(cfg.metrics.ray_export)
        from corea.serve.strategies import StrategyServer

        self.strategies = StrategyServer(self.tiers["slm"], self.tiers["llm"], cfg, self.metrics)

    async def probe(self) -> dict[str, str]:
        names = [n for n, t in self.tiers.items() if t is not None]
        states = await asyncio.gather(*(self.tiers[n].probe() for n in names))
        return dict(zip(names, states))

    def __serve_build_asgi_app__(self):
        return create_app(self.cascade, self.settings, self.metrics, self.probe, self.strategies)


class _DirectSLM(TierServer):
    """The SLM served alone behind the same HTTP API (model ``slm_model_id`` only): engine and HTTP in one
    replica, as a plain SLM server would be. The baseline the cascade's overhead is measured against."""

    def __init__(self, tier: dict[str, Any], config: dict[str, Any]) -> None:
        cfg = ServeConfig.model_validate(config)
        super().__init__(tier, "slm", cfg.work_dir, cfg.limits.max_prompt_tokens)
        self.cascade = _cascade(cfg, LocalTier(self), None)
        self.settings = IngressSettings.from_config(cfg, cfg.auth.api_key_sha256, direct=True)
        self.metrics = CascadeMetrics(cfg.metrics.ray_export)

    def __serve_build_asgi_app__(self):
        return create_app(self.cascade, self.settings, self.metrics)


SLM = serve.deployment(name="SLM")(TierServer)
LLM = serve.deployment(name="LLM")(TierServer)
CascadeIngress = serve.deployment(name="CascadeIngress")(serve.ingress()(_CascadeIngress))
SLMDirect = serve.deployment(name="SLMDirect")(serve.ingress()(_DirectSLM))
