"""The OpenAI-compatible HTTP API of the cascade, as a FastAPI app (built per ingress replica).

Routes: ``POST /v1/chat/completions`` (plain or ``stream: true`` server-sent events ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /healthz`` (``?tiers=true`` also probes the tiers) and
``GET /metrics`` (Prometheus text). Every error is an OpenAI-style JSON body; client mistakes are 4xx
(401 bad key, 400 invalid request, 404 unknown model or route, 408 body too slow, 413 body too large, 415 a
body that is not ``application/json``), an unavailable or overloaded tier is 503 with ``Retry-After``; every
error response is counted in ``/metrics`` by outcome, and a request whose client left before its response was
complete as ``cancelled`` (never an error). ``GET /openapi.json`` describes the API, the chat completions request
body included. CORS is off unless ``http.cors_allow_origins`` lists origins.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from corea.serve.cascade import Cascade, CascadeStream, TierOverloaded, TierRejected, TierUnavailable, check_prompt
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
    openapi_document,
    openapi_request_body,
    openapi_responses,
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
    cors_allow_origins: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: ServeConfig, key_digests=(), direct: bool = False) -> "IngressSettings":
        c = cfg.cascade
        if direct:
            models = {c.slm_model_id: "slm"}
        else:
            models = {c.model_id: "cascade", **cfg.strategies.model_ids}  # step strategies: corea.serve.strategies
            if c.expose_tiers:
                models.update({c.slm_model_id: "slm", c.llm_model_id: "llm"})
        return cls(models, c.threshold, cfg.limits, frozenset(key_digests), tuple(cfg.http.cors_allow_origins))


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _unavailable(exc: TierUnavailable) -> ApiError:
    """503 with ``Retry-After``: ``tier_overloaded`` when the tier shed the request, else ``tier_unavailable``."""
    code = "tier_overloaded" if isinstance(exc, TierOverloaded) else "tier_unavailable"
    return ApiError(503, str(exc), "service_unavailable", code=code,
                    headers={"retry-after": str(max(1, round(exc.retry_after_s)))})


def body_deadline(start: float, received: int, timeout_s: float, min_rate_bps: float, grace_s: float = 1.0) -> float:
    """When the next body bytes must have arrived: ``start + min(timeout_s, grace_s + received / min_rate_bps)``
    (seconds on the same clock as ``start``): the whole body within ``timeout_s``, and after the grace period
    an average rate of at least ``min_rate_bps``."""
    return start + min(timeout_s, grace_s + received / min_rate_bps)


def check_json_content_type(request: Request) -> None:
    """Only ``application/json`` bodies (415 otherwise): no form or text/plain POST without a CORS preflight."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the request body must be application/json, not {kind[:60] or 'untyped'}",
                       code="unsupported_media_type")


async def read_body(request: Request, limit: int, timeout_s: float = 10.0, min_rate_bps: float = 1024.0) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413) without reading past it, and a body that
    arrives slower than ``body_deadline`` allows (408)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    stream = request.stream().__aiter__()
    while True:
        wait = body_deadline(start, size, timeout_s, min_rate_bps) - loop.time()
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(wait, 0.001))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body arrived too slowly ({size} bytes in "
                                f"{loop.time() - start:.1f} s)", code="request_timeout") from None
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class ClientGone:
    """ASGI middleware: a request whose client left before its response was complete (a disconnect received, a
    send that failed, or Serve cancelling the request when its proxy saw the client go) is counted as
    ``outcome="cancelled"`` and logged on one INFO line, never as an error with a traceback. The chat route puts
    the request's model in ``scope["corea.model"]`` once it is known."""

    def __init__(self, app, metrics: CascadeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"gone": False, "complete": False}

        async def watched_receive():
            message = await receive()
            state["gone"] = state["gone"] or message["type"] == "http.disconnect"
            return message

        async def watched_send(message) -> None:
            try:
                await send(message)
            except OSError:  # the connection is gone (ASGI 2.4 servers raise it from send)
                state["gone"] = True
                raise
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True

        try:
            await self.app(scope, watched_receive, watched_send)
        except asyncio.CancelledError:
            if not state["complete"]:
                self._cancelled(scope, "cancelled")
            raise
        except Exception as exc:
            if state["complete"] or not (state["gone"] or isinstance(exc, ClientDisconnect)):
                raise
            self._cancelled(scope, type(exc).__name__)
            return
        if state["gone"] and not state["complete"]:
            self._cancelled(scope, "disconnected")

    def _cancelled(self, scope, how: str) -> None:
        model = scope.get("corea.model")
        log.info("client left before the response was complete: %s %s, model %s (%s)", scope.get("method"),
                 scope.get("path"), model, how)
        self.metrics.failure(model, "cancelled")


def create_app(cascade: Cascade, settings: IngressSettings, metrics: CascadeMetrics,
               probe: Probe | None = None, strategies=None) -> FastAPI:
    """The FastAPI app serving ``cascade`` under ``settings``; ``strategies`` (``corea.serve.strategies``)
    answers requests whose model id or ``corea.strategy`` selects steer, stepwise_policy or cope."""
    app = FastAPI(title="COREA cascade", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    limits = settings.limits
    silent_tiers: dict[str, float] = {}  # tiers that gave no prompt-check verdict lately (cascade.check_prompt)
    app.add_middleware(ClientGone, metrics=metrics)
    if settings.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_allow_origins),
                           allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"])

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        metrics.failure(None, "client_error" if exc.status_code < 500 else "error")
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        metrics.failure(None, "client_error")
        return JSONResponse(error_body(f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param),
                            status_code=400)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("unhandled error in the COREA ingress")
        metrics.failure(None, "error")
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
        if req.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens")
        return {"max_tokens": max_tokens, "min_tokens": req.min_tokens,
                "temperature": limits.default_temperature if req.temperature is None else req.temperature,
                "top_p": 1.0 if req.top_p is None else req.top_p, "seed": req.seed, "stop": list(req.stop or [])}

    @app.get("/healthz", responses=openapi_responses(503))
    async def healthz(tiers: bool = False):
        if not tiers or probe is None:
            return {"status": "ok"}
        states = await probe()
        slm_ok = states.get("slm", "ok") == "ok"
        status = "ok" if all(s == "ok" for s in states.values()) else ("degraded" if slm_ok else "unavailable")
        return JSONResponse({"status": status, "tiers": states}, status_code=200 if slm_ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", responses=openapi_responses(401))
    async def list_models(request: Request):
        authorize(request)
        return models_body(list(settings.models))

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": openapi_request_body()},
              responses=openapi_responses(400, 401, 404, 408, 413, 415, 503, completion=True))
    async def chat(request: Request):
        start, model = time.perf_counter(), None
        try:
            authorize(request)
            check_json_content_type(request)
            body = await read_body(request, limits.max_body_bytes, limits.body_timeout_s, limits.body_min_rate_bps)
            parse = functools.partial(parse_chat_request, body, limits.max_messages, limits.max_json_depth)
            req = parse() if len(body) <= 1 << 16 else await asyncio.to_thread(parse)  # the loop keeps serving
            if req.model not in settings.models:
                raise ApiError(404, f"the model {req.model[:100]!r} does not exist; available: "
                                    f"{', '.join(settings.models)}", param="model", code="model_not_found")
            model, mode = req.model, settings.models[req.model]
            request.scope["corea.model"] = model
            params = sampling(req)
            messages = with_instruction([m.as_chat() for m in req.messages])
            if mode not in ("slm", "llm"):  # a forced tier checks the request itself before it generates
                await check_prompt({"slm": cascade.slm, "llm": cascade.llm}, messages, params, quiet=silent_tiers)
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
            metrics.failure(model, "overloaded" if isinstance(exc, TierOverloaded) else "unavailable")
            raise _unavailable(exc) from None
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

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app, models=list(settings.models), max_messages=limits.max_messages,
                                                  max_tokens=limits.max_tokens)
        return app.openapi_schema

    app.openapi = openapi
    return app
