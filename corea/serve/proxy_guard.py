"""An ASGI middleware for Ray Serve's HTTP proxy: slow bodies cut in the proxy, every proxy error as JSON.

Ray Serve hands a request to an ingress replica as soon as its headers arrive and streams the body after it,
so a client that declares a large body and sends nothing holds one of the replica's ``max_ongoing_requests``
until it lets go. Serve's own knobs do not bound that: ``http_options.request_timeout_s`` is end to end (it
would also cut long generations) and ``keep_alive_timeout_s`` only covers idle connections between requests.
Serve does let a deployment add proxy middlewares: ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names a
function returning Starlette middlewares, called when each proxy starts (set it in the environment of the
process that starts Ray, or of every ``ray start``):

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=corea.serve.proxy_guard:middlewares

``ProxyGuard`` then

- reads the whole body in the proxy before the request is routed: it must arrive within ``body_timeout_s``
  and, after a 1 s grace, at an average of at least ``min_rate_bps`` (``ingress.body_deadline``), else 408;
  more than ``max_body_bytes`` is 413. Slow clients hold proxy coroutines only, never replica slots;
- answers with an OpenAI-style JSON error (and ``Retry-After`` on 503) where the proxy would send text/plain
  (404 unknown route, 408, 429/503 back-pressure) or nothing at all (the ingress replica died with the
  request in flight: uvicorn's bare 500 becomes 503 ``replica_unavailable``); a route miss while the proxy's
  own ``/-/healthz`` says it is not ready (a restarted proxy before the route table arrives) is 503
  ``proxy_starting``, not 404;
- refuses WebSocket handshakes (the API has none).

``middlewares()`` also turns off uvicorn's WebSocket protocol in the proxy process (Serve builds its
``uvicorn.Config`` with ``ws="auto"`` and exposes no option for it). Upstream, with the ``websockets`` library
installed, a non-GET request carrying ``Connection: Upgrade`` / ``Upgrade: websocket`` is handed to uvicorn's
sans-I/O WebSocket protocol, whose handshake parser fails on it and raises in ``handle_parser_exception``
(uvicorn 0.54) before anything is written: the connection is never answered. Without the WebSocket protocol,
uvicorn's h11 protocol treats ``Upgrade`` as unsupported and serves the request as plain HTTP.

Settings come from ``COREA_BODY_TIMEOUT_S``, ``COREA_BODY_MIN_RATE_BPS`` and ``COREA_MAX_BODY_BYTES``
(``corea.serve.app.proxy_env`` writes them from the serving config).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from corea.serve.ingress import body_deadline

log = logging.getLogger(__name__)
CALLBACK = "corea.serve.proxy_guard:middlewares"
_KEPT_HEADERS = (b"retry-after", b"x-request-id")


def _json_error(status: int, message: str, code: str | None, headers: list[tuple[bytes, bytes]] = ()) -> list[dict]:
    kind = "invalid_request_error" if status < 500 else "service_unavailable" if status == 503 else "server_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    return [{"type": "http.response.start", "status": status, "headers": head},
            {"type": "http.response.body", "body": body, "more_body": False}]


_CODES = {404: "not_found", 408: "request_timeout", 413: "request_too_large", 429: "rate_limited",
          503: "service_unavailable", 500: "server_error"}


class ProxyGuard:
    """Pure ASGI middleware; see the module docstring."""

    def __init__(self, app, body_timeout_s: float = 10.0, min_rate_bps: float = 1024.0,
                 max_body_bytes: int = 1 << 20) -> None:
        self.app, self.body_timeout_s, self.min_rate_bps = app, body_timeout_s, min_rate_bps
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(scope, receive)
        except _Refused as exc:
            for message in _json_error(exc.status, exc.message, _CODES.get(exc.status)):
                await send(message)
            return
        if body is None:  # the client went away while sending
            return
        gone = asyncio.Event()
        await self._forward(scope, _replay(body, receive, gone), send, gone)

    async def _read_body(self, scope, receive) -> bytes | None:
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _Refused(413, f"the request body exceeds {self.max_body_bytes} bytes")
        loop = asyncio.get_running_loop()
        start, chunks, size = loop.time(), [], 0
        while True:
            wait = body_deadline(start, size, self.body_timeout_s, self.min_rate_bps) - loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.001))
            except asyncio.TimeoutError:
                raise _Refused(408, f"the request body arrived too slowly ({size} bytes in "
                                    f"{loop.time() - start:.1f} s)") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _Refused(413, f"the request body exceeds {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _forward(self, scope, receive, send, gone: asyncio.Event) -> None:
        state: dict[str, Any] = {"started": False, "rewrite": None}

        async def guarded_send(message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                state["started"] = True
                headers = list(message.get("headers") or ())
                ctype = dict(headers).get(b"content-type", b"")
                if message["status"] >= 400 and not ctype.startswith(b"application/json"):
                    state["rewrite"] = {"status": message["status"], "text": b"",
                                        "headers": [(k, v) for k, v in headers if k.lower() in _KEPT_HEADERS]}
                    return
            elif kind == "http.response.body" and state["rewrite"] is not None:
                rewrite = state["rewrite"]
                rewrite["text"] = (rewrite["text"] + message.get("body", b""))[:1000]
                if message.get("more_body", False):
                    return
                status, code, headers = rewrite["status"], _CODES.get(rewrite["status"]), rewrite["headers"]
                text = rewrite["text"].decode("utf-8", "replace").strip() or f"HTTP {status}"
                if status == 404 and not await self._proxy_ready(scope):
                    status, code, headers = 503, "proxy_starting", [*headers, (b"retry-after", b"1")]
                    text = "the server is starting and has no routes yet; retry"
                for m in _json_error(status, text, code, headers):
                    await send(m)
                return
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception:  # noqa: BLE001 - the proxy normally answers itself; never a bare 500
            log.exception("the Serve proxy raised while handling a request")
        if not state["started"] and not gone.is_set():  # nobody answered a client still there
            log.warning("no response for %s %s: the ingress replica stopped with the request in flight",
                        scope.get("method"), scope.get("path"))
            for message in _json_error(503, "the server replica handling this request stopped; retry",
                                       "replica_unavailable", [(b"retry-after", b"1")]):
                await send(message)


    async def _proxy_ready(self, scope) -> bool:
        """The proxy's own ``/-/healthz`` verdict: a fresh proxy answers every path with 404 until the controller
        has sent it the route table, while its health route already says 503 (not ready for traffic)."""
        status = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        probe = {**scope, "method": "GET", "path": "/-/healthz", "raw_path": b"/-/healthz", "query_string": b"",
                 "headers": []}
        try:
            await self.app(probe, receive, send)
        except Exception:  # noqa: BLE001 - an unanswerable probe means not ready
            return False
        return status == [200]


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _replay(body: bytes, receive, gone: asyncio.Event):
    """A ``receive`` that yields the buffered body once, then defers to the client's (``gone`` is set when
    it disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
        return message

    return replay


def settings_from_env(env=os.environ) -> dict[str, float]:
    return {"body_timeout_s": float(env.get("COREA_BODY_TIMEOUT_S", 10.0)),
            "min_rate_bps": float(env.get("COREA_BODY_MIN_RATE_BPS", 1024.0)),
            "max_body_bytes": int(env.get("COREA_MAX_BODY_BYTES", 1 << 20))}


def http_only_uvicorn() -> None:
    """Make uvicorn's ``ws="auto"`` resolve to no WebSocket protocol in this process (read when the proxy's
    ``uvicorn.Config`` loads, after the proxy callback has run)."""
    import uvicorn.protocols.websockets.auto as auto

    auto.AutoWebSocketsProtocol = None


def middlewares() -> list:
    """The callback of ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, run once in each proxy process."""
    from starlette.middleware import Middleware

    http_only_uvicorn()
    return [Middleware(ProxyGuard, **settings_from_env())]
