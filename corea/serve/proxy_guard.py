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
- refuses WebSocket handshakes (the API has none);
- with ``COREA_API_KEY_SHA256`` (the API keys' digests), answers Serve's ``/-/routes`` only to a request with a
  valid ``Authorization: Bearer`` key (401 JSON otherwise); ``/-/healthz`` stays open for load balancers.

``middlewares()`` also replaces uvicorn's HTTP protocol in the proxy process by ``json_http_protocol`` of it, so
that what uvicorn answers itself, before any ASGI middleware runs, is JSON too: a request its parser rejects
(unknown method, bad ``Content-Length``, obs-fold, bare LF, NUL in a header, an HTTP/2 preface, ...) is 400
``invalid_http_request`` instead of text/plain "Invalid HTTP request received."; a request line and headers over
``COREA_MAX_HEADER_BYTES`` (32 KiB) or with more than ``COREA_MAX_HEADERS`` (100) headers is 431; headers not in
within ``COREA_HEADER_TIMEOUT_S`` (10 s) of the first byte are 408 (a connection that sends nothing is closed).
The bounds and the timeout apply to uvicorn's httptools protocol (what Serve runs when httptools is installed);
on its h11 fallback, h11's own 16 KiB bound on the request head applies and its errors are JSON 400.

``middlewares()`` also turns off uvicorn's WebSocket protocol in the proxy process (Serve builds its
``uvicorn.Config`` with ``ws="auto"`` and exposes no option for it). Upstream, with the ``websockets`` library
installed, a non-GET request carrying ``Connection: Upgrade`` / ``Upgrade: websocket`` is handed to uvicorn's
sans-I/O WebSocket protocol, whose handshake parser fails on it and raises in ``handle_parser_exception``
(uvicorn 0.54) before anything is written: the connection is never answered. Without the WebSocket protocol,
uvicorn's h11 protocol treats ``Upgrade`` as unsupported and serves the request as plain HTTP.

Settings come from ``COREA_BODY_TIMEOUT_S``, ``COREA_BODY_MIN_RATE_BPS``, ``COREA_MAX_BODY_BYTES`` and the
header variables above (``corea.serve.app.proxy_env`` writes them from the serving config).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from http import HTTPStatus
from typing import Any

from corea.serve.ingress import body_deadline

log = logging.getLogger(__name__)
CALLBACK = "corea.serve.proxy_guard:middlewares"
_KEPT_HEADERS = (b"retry-after", b"x-request-id")


def _error_json(status: int, message: str, code: str | None) -> bytes:
    kind = "invalid_request_error" if status < 500 else "service_unavailable" if status == 503 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


def _json_error(status: int, message: str, code: str | None, headers: list[tuple[bytes, bytes]] = ()) -> list[dict]:
    body = _error_json(status, message, code)
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    return [{"type": "http.response.start", "status": status, "headers": head},
            {"type": "http.response.body", "body": body, "more_body": False}]


_CODES = {401: "invalid_api_key", 404: "not_found", 408: "request_timeout", 413: "request_too_large",
          429: "rate_limited", 503: "service_unavailable", 500: "server_error"}


class ProxyGuard:
    """Pure ASGI middleware; see the module docstring."""

    def __init__(self, app, body_timeout_s: float = 10.0, min_rate_bps: float = 1024.0,
                 max_body_bytes: int = 1 << 20, key_digests: frozenset[str] = frozenset(), **_: Any) -> None:
        self.app, self.body_timeout_s, self.min_rate_bps = app, body_timeout_s, min_rate_bps
        self.max_body_bytes, self.key_digests = max_body_bytes, frozenset(key_digests)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") == "/-/routes" and self.key_digests and not self._authorized(scope):
            for message in _json_error(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                       "invalid_api_key", [(b"www-authenticate", b"Bearer")]):
                await send(message)
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

    def _authorized(self, scope) -> bool:
        """A Bearer key whose SHA-256 is one of ``key_digests`` (as the ingress checks it)."""
        scheme, _, key = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1").partition(" ")
        digest = hashlib.sha256(key.strip().encode()).hexdigest() if scheme.lower() == "bearer" and key.strip() else ""
        return any(hmac.compare_digest(digest, d) for d in self.key_digests)

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


def settings_from_env(env=os.environ) -> dict[str, Any]:
    return {"body_timeout_s": float(env.get("COREA_BODY_TIMEOUT_S", 10.0)),
            "min_rate_bps": float(env.get("COREA_BODY_MIN_RATE_BPS", 1024.0)),
            "max_body_bytes": int(env.get("COREA_MAX_BODY_BYTES", 1 << 20)),
            "key_digests": frozenset(d for d in env.get("COREA_API_KEY_SHA256", "").split(",") if d),
            "max_headers": int(env.get("COREA_MAX_HEADERS", 100)),
            "max_header_bytes": int(env.get("COREA_MAX_HEADER_BYTES", 32 << 10)),
            "header_timeout_s": float(env.get("COREA_HEADER_TIMEOUT_S", 10.0))}


def _raw_response(status: int, message: str, code: str, default_headers=()) -> bytes:
    """A whole HTTP/1.1 response carrying an OpenAI-style error, closing the connection."""
    body = _error_json(status, message, code)
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()]
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
             b"connection: close\r\n\r\n"]
    return b"".join(head) + body


def json_http_protocol(base: type, max_headers: int = 100, max_header_bytes: int = 32 << 10,
                       header_timeout_s: float = 10.0) -> type:
    """``base`` (uvicorn's httptools or h11 protocol) answering its own errors as OpenAI-style JSON, with bounds on
    the request head (see the module docstring)."""

    class JsonErrorsProtocol(base):
        corea_json_errors = True

        def _refuse(self, status: int, message: str, code: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(_raw_response(status, message, code, self.server_state.default_headers))
                self.transport.close()

        def send_400_response(self, msg: str) -> None:  # uvicorn's answer to a request its parser rejects
            refused = getattr(self, "_corea_refused", None)
            self._refuse(*(refused or (400, "the request is not valid HTTP/1.1", "invalid_http_request")))

        # the head's bounds and deadline: httptools' parser callbacks (h11 has none of these)
        def _arm(self) -> None:
            if getattr(self, "_corea_timer", None) is None:
                self._corea_timer = asyncio.get_running_loop().call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            timer, self._corea_timer = getattr(self, "_corea_timer", None), None
            if timer is not None:
                timer.cancel()

        def _too_slow(self) -> None:
            self._corea_timer = None
            if getattr(self, "_corea_head", 0) or getattr(self, "_corea_pending", 0):
                self._refuse(408, f"the request headers did not arrive within {header_timeout_s:g} s",
                             "request_timeout")
            elif not self.transport.is_closing():
                self.transport.close()  # nothing sent: an idle connection

        def _grow(self, size: int, header: bool) -> None:
            self._corea_head = getattr(self, "_corea_head", 0) + size
            self._corea_count = getattr(self, "_corea_count", 0) + header
            if self._corea_head > max_header_bytes or self._corea_count > max_headers:
                what = (f"more than {max_headers} headers" if self._corea_count > max_headers
                        else f"a request line and headers over {max_header_bytes} bytes")
                self._corea_refused = (431, f"the request has {what}", "request_header_fields_too_large")
                raise ValueError(self._corea_refused[1])  # stops the parser; uvicorn calls send_400_response

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if hasattr(base, "on_message_begin"):
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            in_head = hasattr(base, "on_message_begin") and getattr(self, "_corea_timer", None) is not None
            super().data_received(data)
            if in_head and getattr(self, "_corea_timer", None) is not None:  # the head is still incomplete
                self._corea_pending = getattr(self, "_corea_pending", 0) + len(data)
                if self._corea_pending > max_header_bytes:  # e.g. one endless header the parser buffers
                    self._refuse(431, f"the request has a request line and headers over {max_header_bytes} "
                                      "bytes", "request_header_fields_too_large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._corea_head = self._corea_count = self._corea_pending = 0
            self._arm()

        def on_url(self, url: bytes) -> None:
            self._grow(len(url), header=False)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._grow(len(name) + len(value) + 4, header=True)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

    if not hasattr(base, "on_message_begin"):  # h11: no parser callbacks to bound the head with
        for name in ("on_message_begin", "on_url", "on_header", "on_headers_complete"):
            delattr(JsonErrorsProtocol, name)
    JsonErrorsProtocol.__name__ = JsonErrorsProtocol.__qualname__ = f"JsonErrors{base.__name__}"
    return JsonErrorsProtocol


def json_http_uvicorn(**limits: Any) -> None:
    """Make uvicorn's ``http="auto"`` resolve to ``json_http_protocol`` of its usual protocol in this process (read
    when the proxy's ``uvicorn.Config`` loads, after the proxy callback has run)."""
    import uvicorn.protocols.http.auto as auto

    if not getattr(auto.AutoHTTPProtocol, "corea_json_errors", False):
        auto.AutoHTTPProtocol = json_http_protocol(auto.AutoHTTPProtocol, **limits)


def http_only_uvicorn() -> None:
    """Make uvicorn's ``ws="auto"`` resolve to no WebSocket protocol in this process (read when the proxy's
    ``uvicorn.Config`` loads, after the proxy callback has run)."""
    import uvicorn.protocols.websockets.auto as auto

    auto.AutoWebSocketsProtocol = None


def middlewares() -> list:
    """The callback of ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, run once in each proxy process."""
    from starlette.middleware import Middleware

    settings = settings_from_env()
    http_only_uvicorn()
    json_http_uvicorn(**{k: settings[k] for k in ("max_headers", "max_header_bytes", "header_timeout_s")})
    return [Middleware(ProxyGuard, **settings)]
