"""What reaches Serve's proxy before any ASGI code, over real sockets: uvicorn with ``proxy_guard``'s HTTP protocol
answers malformed HTTP, oversized or slow request heads as OpenAI-style JSON, and Serve's ``/-/routes`` needs an
API key when keys are configured."""

import asyncio
import json
import os
import socket
import threading
import time

import pytest
import uvicorn
from support import free_port
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from corea.serve.proxy_guard import ProxyGuard, json_http_protocol, middlewares, settings_from_env


async def echo(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    out = json.dumps({"received": len(body)}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


@pytest.fixture(scope="module", params=[HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
def server(request):
    port = free_port()
    protocol = json_http_protocol(request.param, max_headers=20, max_header_bytes=4096, header_timeout_s=1.0)
    config = uvicorn.Config(ProxyGuard(echo, body_timeout_s=2), host="127.0.0.1", port=port, lifespan="off",
                            log_level="critical", ws="none", http=protocol)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield port, request.param
    srv.should_exit = True
    thread.join(10)


def exchange(port: int, data: bytes, wait: float = 4.0) -> tuple[int | None, dict[str, str], bytes]:
    """Send raw bytes; the status, headers and body of the first response (None: nothing came back)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(wait)
        if data:
            sock.sendall(data)
        out = b""
        try:
            while b"\r\n\r\n" not in out or not _complete(out):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
    if not out:
        return None, {}, b""
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def _complete(out: bytes) -> bool:
    head, _, body = out.partition(b"\r\n\r\n")
    length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")]
    return bool(length) and len(body) >= length[0] or body.endswith(b"0\r\n\r\n")


def assert_json_error(response, status: int, code: str) -> None:
    got, headers, body = response
    assert got == status, response
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]


MALFORMED = {  # what uvicorn's parsers reject before any ASGI code runs
    "bad Content-Length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "two Content-Lengths": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "bad chunk size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "NUL in a header": b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    "space before the colon": b"GET / HTTP/1.1\r\nHost: x\r\nX : a\r\n\r\n",
    "non-ASCII in the path": b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
}
MALFORMED_HTTPTOOLS = {  # what only httptools (llhttp) rejects; h11 serves these
    "unknown method": b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
    "bare LF": b"GET / HTTP/1.1\nHost: x\n\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "Content-Length with chunked": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked"
                                   b"\r\n\r\n0\r\n\r\n",
    "HTTP/9.9": b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("name", [*MALFORMED, *MALFORMED_HTTPTOOLS])
def test_malformed_http_is_a_json_400(server, name):
    port, protocol = server
    if name in MALFORMED_HTTPTOOLS and protocol is H11Protocol:
        pytest.skip("h11 accepts it")
    assert_json_error(exchange(port, {**MALFORMED, **MALFORMED_HTTPTOOLS}[name]), 400, "invalid_http_request")


def test_request_heads_are_bounded_in_count_size_and_time(server):
    port, protocol = server
    if protocol is H11Protocol:  # h11 bounds the head at 16 KiB itself (a 400)
        assert_json_error(exchange(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000), 400, "invalid_http_request")
        return
    many = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(30)) + b"\r\n"
    assert_json_error(exchange(port, many), 431, "request_header_fields_too_large")
    assert_json_error(exchange(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 8192 + b"\r\n\r\n"), 431,
                      "request_header_fields_too_large")
    assert_json_error(exchange(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000), 431,  # never ends
                      "request_header_fields_too_large")
    start = time.perf_counter()
    assert_json_error(exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n"), 408, "request_timeout")
    assert time.perf_counter() - start < 3
    assert exchange(port, b"")[0] is None  # a connection that sends nothing is closed, unanswered
    ok = exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(15))
                  + b"Content-Length: 2\r\n\r\n{}")
    assert ok[0] == 200 and json.loads(ok[2]) == {"received": 2}


def test_keep_alive_requests_are_not_cut_by_the_head_deadline(server):
    port, _ = server
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        for _ in range(2):
            sock.sendall(request)
            time.sleep(1.5)  # longer than the head deadline, between requests: uvicorn's keep-alive applies
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_middlewares_install_the_json_protocol_in_uvicorn(monkeypatch):
    import uvicorn.protocols.http.auto as auto
    import uvicorn.protocols.websockets.auto as ws_auto

    monkeypatch.setattr(auto, "AutoHTTPProtocol", auto.AutoHTTPProtocol)
    monkeypatch.setattr(ws_auto, "AutoWebSocketsProtocol", ws_auto.AutoWebSocketsProtocol)
    monkeypatch.setenv("COREA_MAX_HEADERS", "50")
    (guard,) = middlewares()
    middlewares()  # once per proxy process, but twice is harmless
    config = uvicorn.Config(echo, lifespan="off")
    config.load()
    assert config.http_protocol_class.corea_json_errors and config.ws_protocol_class is None
    assert config.http_protocol_class.__mro__[1] is HttpToolsProtocol  # wrapped once
    assert guard.kwargs["max_headers"] == 50


def run_guard(scope_headers, path="/-/routes", digests=frozenset()):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def routes(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"/": "corea"}'})

    scope = {"type": "http", "method": "GET", "path": path, "headers": scope_headers}
    asyncio.run(ProxyGuard(routes, key_digests=digests)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_serve_routes_need_an_api_key_when_keys_are_configured(monkeypatch):
    from corea.serve.ingress import key_digest

    digests = frozenset({key_digest("sesame")})
    assert run_guard([])[0] == 200  # no keys configured: open, as before
    status, body = run_guard([], digests=digests)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert run_guard([(b"authorization", b"Bearer wrong")], digests=digests)[0] == 401
    assert run_guard([(b"authorization", b"Bearer sesame")], digests=digests) == (200, b'{"/": "corea"}')
    assert run_guard([], path="/-/healthz", digests=digests)[0] == 200  # load balancers' probe stays open
    monkeypatch.setenv("COREA_API_KEY_SHA256", ",".join(digests))
    assert settings_from_env()["key_digests"] == digests


def test_proxy_env_carries_the_head_bounds_and_the_key_digests(monkeypatch):
    from test_serve_unit import TINY

    from corea.serve.app import prepare, proxy_env
    from corea.serve.config import load_serve_config
    from corea.serve.ingress import key_digest

    env = proxy_env(load_serve_config(TINY, {"limits.max_headers": 64, "limits.header_timeout_s": 5}))
    assert env["COREA_MAX_HEADERS"] == "64" and env["COREA_HEADER_TIMEOUT_S"] == "5"
    assert env["COREA_MAX_HEADER_BYTES"] == "32768" and "COREA_API_KEY_SHA256" not in env
    monkeypatch.setenv("COREA_TEST_KEYS", "k1,k2")
    cfg = prepare(load_serve_config(TINY, {"auth.api_keys_env": "COREA_TEST_KEYS"}))
    assert set(proxy_env(cfg)["COREA_API_KEY_SHA256"].split(",")) == {key_digest("k1"), key_digest("k2")}
    settings = settings_from_env(proxy_env(cfg))
    assert settings["max_headers"] == 100 and settings["key_digests"] == {key_digest("k1"), key_digest("k2")}


LISTENERS = """
import json, sys
import psutil, ray
from corea.serve.cli import _connect
from corea.serve.config import load_serve_config
_connect(load_serve_config(sys.argv[1], {"http.host": sys.argv[2], "ray.num_cpus": 1}))
ray.get(ray.remote(lambda: 1).remote())  # a worker is up
children = {p.pid: p.name() for p in psutil.Process().children(recursive=True)}
found = sorted({(c.laddr.ip, children.get(c.pid, "driver")) for c in psutil.net_connections("inet")
                if c.status == "LISTEN" and (c.pid in children or c.pid == psutil.Process().pid)})
ray.shutdown()
print(json.dumps(found))
"""


@pytest.mark.slow
def test_a_local_cluster_serving_on_loopback_keeps_ray_on_loopback(tmp_path):
    import subprocess
    import sys

    from test_serve_unit import TINY

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", LISTENERS, str(TINY), "127.0.0.1"], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    listeners = json.loads(out.stdout.strip().splitlines()[-1])
    assert {name for _, name in listeners} >= {"gcs_server", "raylet"}, listeners
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip, _ in listeners), listeners


def test_connect_starts_a_loopback_node_only_for_a_loopback_host(monkeypatch):
    import ray
    from ray._private import ray_constants
    from test_serve_unit import TINY

    from corea.serve import cli
    from corea.serve.config import load_serve_config

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})  # a copy
    cli._connect(load_serve_config(TINY, {"http.host": "0.0.0.0"}))
    assert ray_constants.ENABLE_RAY_CLUSTER is True and calls[-1]["dashboard_host"] == "127.0.0.1"
    cli._connect(load_serve_config(TINY))  # 127.0.0.1
    assert ray_constants.ENABLE_RAY_CLUSTER is False and calls[-1]["address"] == "local"
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
