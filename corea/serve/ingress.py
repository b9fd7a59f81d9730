"""The OpenAI-compatible HTTP API of the cascade, as a FastAPI app (built per ingress replica).

Routes: ``POST /v1/chat/completions`` (plain or ``stream: true`` server-sent events ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /healthz`` (``?tiers=true`` also probes the tiers) and
``GET /metrics`` (Prometheus text). Every error is an OpenAI-style JSON body; client mistakes are 4xx
(401 bad key, 400 invalid request, 404 unknown model or route, 413 body too large), an unavailable tier is 503.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corea.serve.cascade import Cascade, CascadeStream, TierRejected, TierUnavailable
from corea.serve.config import LimitsConfig, ServeConfig
from corea.serve.metrics import CascadeMetrics
from corea.serve.openai_schema import (
    ApiError,
    ChatRequest,
    chunk_body,
    completion_body,
    error_body,
    models_body,
    new_id,
    parse_chat_request,
    sse,
    usage_body,
    with_instruction,
)

log = logging.getLogger(__name__)
Probe = Callable[[], Awaitable[dict[str, str]]]


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class IngressSettings:
    """What the HTTP layer needs: served model ids (id -> mode), default threshold, limits, key digests."""

    models: dict[str, str]
    threshold: float
    limits: LimitsConfig
    key_digests: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, cfg: ServeConfig, key_digests=(), direct: bool = False) -> "IngressSettings":
        c = cfg.cascade
        if direct:
            models = {c.slm_model_id: "slm"}
        else:
            models = {c.model_id: "cascade", **cfg.strategies.model_ids}  # step strategies: corea.serve.strategies
            if c.expose_tiers:
                models.update({c.slm_model_id: "slm", c.llm_model_id: "llm"})
        return cls(models, c.threshold, cfg.limits, frozenset(key_digests))


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413) without reading past it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(cascade: Cascade, settings: IngressSettings, metrics: CascadeMetrics,
               probe: Probe | None = None, strategies=None) -> FastAPI:
    """The FastAPI app serving ``cascade`` under ``settings``; ``strategies`` (``corea.serve.strategies``)
    answers requests whose model id or ``corea.strategy`` selects steer, stepwise_policy or cope."""
    app = FastAPI(title="COREA cascade", docs_url=None, redoc_url=None, openapi_url=None)
    limits = settings.limits

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param),
                            status_code=400)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("unhandled error in the COREA ingress")
        return JSONResponse(error_body("internal error", "server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if not settings.key_digests:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        digest = key_digest(key.strip()) if scheme.lower() == "bearer" and key.strip() else ""
        if not any(hmac.compare_digest(digest, d) for d in settings.key_digests):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           code="invalid_api_key", headers={"www-authenticate": "Bearer"})

    def sampling(req: ChatRequest) -> dict[str, Any]:
        max_tokens = req.requested_max_tokens() or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}; at most {limits.max_tokens} is allowed",
                           param="max_tokens")
        return {"max_tokens": max_tokens,
                "temperature": limits.default_temperature if req.temperature is None else req.temperature,
                "top_p": 1.0 if req.top_p is None else req.top_p, "seed": req.seed, "stop": list(req.stop or [])}

    @app.get("/healthz")
    async def healthz(tiers: bool = False):
        if not tiers or probe is None:
            return {"status": "ok"}
        states = await probe()
        slm_ok = states.get("slm", "ok") == "ok"
        status = "ok" if all(s == "ok" for s in states.values()) else ("degraded" if slm_ok else "unavailable")
        return JSONResponse({"status": status, "tiers": states}, status_code=200 if slm_ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return models_body(list(settings.models))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        start, model = time.perf_counter(), None
        try:
            authorize(request)
            req = parse_chat_request(await read_body(request, limits.max_body_bytes), limits.max_messages)
            if req.model not in settings.models:
                raise ApiError(404, f"the model {req.model[:100]!r} does not exist; available: "
                                    f"{', '.join(settings.models)}", param="model", code="model_not_found")
            model, mode = req.model, settings.models[req.model]
            params = sampling(req)
            messages = with_instruction([m.as_chat() for m in req.messages])
            tau = settings.threshold if req.corea.threshold is None else req.corea.threshold
            if strategies is not None and mode not in ("slm", "llm") and strategies.selects(mode, req.corea.strategy):
                return await strategies.respond(req, messages, params, mode, model, start)
            if req.stream:
                plan = await cascade.open_stream(messages, params, mode, tau, model)
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return _streaming(plan, model, include_usage, start)
            result = await cascade.complete(messages, params, mode, tau, model)
        except ApiError as exc:
            metrics.failure(model, "client_error" if exc.status < 500 else "unavailable")
            raise
        except TierRejected as exc:
            metrics.failure(model, "client_error")
            raise ApiError(400, str(exc), param="messages") from None
        except TierUnavailable as exc:
            metrics.failure(model, "unavailable")
            raise ApiError(503, str(exc), "service_unavailable", code="tier_unavailable",
                           headers={"retry-after": "5"}) from None
        metrics.record(result, time.perf_counter() - start, stream=False)
        answer = result.answer
        body = completion_body(new_id(), model, answer.text, answer.finish_reason, usage_body(*result.usage()),
                               result.meta())
        return JSONResponse(body, headers=result.headers())

    def _streaming(plan: CascadeStream, model: str, include_usage: bool, start: float) -> StreamingResponse:
        rid, created = new_id(), int(time.time())

        async def events():
            yield sse(chunk_body(rid, model, created, {"role": "assistant", "content": ""}))
            try:
                async for delta in plan.deltas():
                    yield sse(chunk_body(rid, model, created, {"content": delta}))
            except (TierUnavailable, TierRejected) as exc:
                unavailable = isinstance(exc, TierUnavailable)
                metrics.failure(model, "unavailable" if unavailable else "client_error")
                yield sse(error_body(str(exc), "service_unavailable" if unavailable else "invalid_request_error",
                                     code="tier_unavailable" if unavailable else None))
                yield sse("[DONE]")
                return
            result = plan.result
            yield sse(chunk_body(rid, model, created, {}, result.answer.finish_reason, corea=result.meta()))
            if include_usage:
                yield sse(chunk_body(rid, model, created, usage=usage_body(*result.usage())))
            yield sse("[DONE]")
            metrics.record(result, time.perf_counter() - start, stream=True)

        headers = {**plan.result.headers(with_cost=False), "cache-control": "no-cache"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app
