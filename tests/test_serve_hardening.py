"""Hostile and malformed input against the HTTP API without a cluster (FastAPI test client, in-process fake
tiers), the tier server's input errors on a tiny checkpoint, and how handle failures map to HTTP."""

import asyncio
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve_unit import TINY, FakeTier, chat, make_app

from corea.engines.base import EngineInputError
from corea.serve.cascade import TierOverloaded, TierRejected, TierUnavailable
from corea.serve.config import load_serve_config
from corea.serve.ingress import body_deadline
from corea.serve.openai_schema import json_depth

JSON = {"content-type": "application/json"}
SURE = "\\boxed{2} \\confidence{0.9}"


def counted(client, outcome: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == "corea_requests_total" and s.labels.get("outcome") == outcome:
                total += s.value
    return total


def deep_field(depth: int) -> bytes:
    return json.dumps(chat(junk=0)).encode().replace(b"0}", b"[" * depth + b"]" * depth + b"}", 1)


@pytest.mark.parametrize("keys", [(), ("sesame",)])
def test_deep_json_is_a_counted_400_before_parsing(keys):
    client, _ = make_app(FakeTier(SURE), FakeTier("x"), keys=keys)
    auth = {"authorization": "Bearer sesame"} if keys else {}
    for body in (b"[" * 969, deep_field(968), b'{"a":' * 5000 + b"1" + b"}" * 5000):
        resp = client.post("/v1/chat/completions", content=body, headers={**JSON, **auth})
        assert resp.status_code == 400, resp.text
        assert "deeper than 32" in resp.json()["error"]["message"]
    assert counted(client, "client_error") == 3 and counted(client, "error") == 0
    ok = client.post("/v1/chat/completions", content=deep_field(20), headers={**JSON, **auth})
    assert ok.status_code == 200  # nesting within the bound is fine (the unknown field is ignored)


def test_json_depth_ignores_brackets_in_strings():
    assert json_depth(b"[" * 969) == 969
    assert json_depth(json.dumps({"a": "[[[{{{\\\"[[", "b": [1, [2, {"c": []}]]}).encode()) == 5
    assert json_depth(b"{}") == 1 and json_depth(b"1") == 0


def test_lone_surrogate_is_a_400_at_validation_and_never_reaches_a_tier():
    slm = FakeTier(SURE)
    client, _ = make_app(slm, FakeTier("x"))
    for content in ("\ud800", [{"type": "text", "text": "a\udfff"}]):
        body = json.dumps(chat(messages=[{"role": "user", "content": content}])).encode()  # ascii escapes
        resp = client.post("/v1/chat/completions", content=body, headers=JSON)
        assert resp.status_code == 400 and "not valid Unicode" in resp.json()["error"]["message"]
    resp = client.post("/v1/chat/completions", content=b'{"model": "\xff"}', headers=JSON)  # not UTF-8
    assert resp.status_code == 400 and "Error" not in resp.json()["error"]["message"]
    assert slm.calls == [] and counted(client, "client_error") == 3 and counted(client, "unavailable") == 0


def test_tier_input_errors_are_clean_client_errors(tiny_checkpoints, tmp_path):
    """The tier itself, on a tiny checkpoint: an untokenizable prompt (validation bypassed) and a prompt over
    ``limits.max_prompt_tokens`` come back as messages without internals; the engine raises EngineInputError."""
    from corea.engines.hf import HFEngine
    from corea.serve.deployments import TierServer

    tier = load_serve_config(TINY, {"slm.model": str(tiny_checkpoints["slm"])}).slm.model_dump()
    server = TierServer(tier, "slm", str(tmp_path), max_prompt_tokens=200)
    params = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}

    async def calls():
        bad = [{"role": "user", "content": "x\ud800"}]
        long = [{"role": "user", "content": "word " * 400}]
        return (await server.generate(bad, params), await server.generate(long, params),
                [item async for item in server.stream(bad, params)])

    bad, long, streamed = asyncio.run(calls())
    assert bad["error"] == "the prompt cannot be tokenized (TypeError)", bad
    assert streamed == [bad]
    assert long["error"].startswith("the prompt has ") and "at most 200 are allowed" in long["error"]
    engine: HFEngine = server.engine
    with pytest.raises(EngineInputError):
        engine.generate([[{"role": "user", "content": "\ud800"}]])


def test_handle_failures_map_to_client_error_overload_or_outage():
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    from corea.serve.deployments import tier_error

    wrapped = RayTaskError("generate", "Traceback ...\nsecret internals", EngineInputError("the prompt has 9 "
                                                                                          "tokens"))
    for exc in (wrapped, wrapped.as_instanceof_cause(), EngineInputError("the prompt has 9 tokens")):
        out = tier_error("slm", exc)
        assert isinstance(out, TierRejected) and str(out) == "the prompt has 9 tokens"
    out = tier_error("slm", BackPressureError(num_queued_requests=4, max_queued_requests=4))
    assert isinstance(out, TierOverloaded) and out.retry_after_s == 1.0
    out = tier_error("llm", ActorDiedError())
    assert type(out) is TierUnavailable and str(out) == "the LLM tier is unavailable: no replica could answer"
    bug = tier_error("slm", RayTaskError("generate", "Traceback", KeyError("k")).as_instanceof_cause())
    assert not isinstance(bug, (TierRejected, TierUnavailable)) and "Traceback" not in str(bug)


def test_overloaded_tier_is_shed_with_retry_after_and_counted():
    class Shedding(FakeTier):
        async def generate(self, messages, params):
            raise TierOverloaded("slm", "its request queue is full")

    client, _ = make_app(Shedding(SURE), FakeTier("x"))
    resp = client.post("/v1/chat/completions", json=chat())
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "tier_overloaded" and counted(client, "overloaded") == 1


def test_null_means_default():
    client, _ = make_app(FakeTier(SURE), FakeTier("x"))
    body = chat(stream=None, n=None, stream_options=None, temperature=None, top_p=None, max_tokens=None,
                seed=None, stop=None, corea=None, logprobs=None, tools=None, tool_choice=None,
                response_format=None, presence_penalty=None)
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert "choices" in resp.json()


@pytest.mark.parametrize("field, value", [
    ("logprobs", True), ("top_logprobs", 3), ("tool_choice", "required"),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("response_format", {"type": "json_object"}), ("logit_bias", {"50256": -100}), ("presence_penalty", 0.5),
])
def test_unsupported_fields_are_a_400_naming_the_field(field, value):
    client, _ = make_app(FakeTier(SURE), FakeTier("x"))
    resp = client.post("/v1/chat/completions", json=chat(**{field: value}))
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_supported_spellings_of_unsupported_fields_pass():
    client, _ = make_app(FakeTier(SURE), FakeTier("x"))
    resp = client.post("/v1/chat/completions", json=chat(logprobs=False, tools=[], tool_choice="none",
                                                         response_format={"type": "text"}, presence_penalty=0))
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_only_json_bodies(ctype):
    client, _ = make_app(FakeTier(SURE), FakeTier("x"))
    headers = {"content-type": ctype} if ctype else {}
    resp = client.post("/v1/chat/completions", content=json.dumps(chat()).encode(), headers=headers)
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"
    ok = client.post("/v1/chat/completions", content=json.dumps(chat()).encode(),
                     headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_cors_is_off_by_default_and_configurable():
    from fastapi.testclient import TestClient

    from corea.serve.cascade import Cascade
    from corea.serve.ingress import IngressSettings, create_app
    from corea.serve.metrics import CascadeMetrics

    preflight = {"origin": "https://evil.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "content-type"}
    client, _ = make_app(FakeTier(SURE), FakeTier("x"))
    assert "access-control-allow-origin" not in client.options("/v1/chat/completions", headers=preflight).headers
    post = client.post("/v1/chat/completions", json=chat(), headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in post.headers
    cfg = load_serve_config(TINY, {"http.cors_allow_origins": ["https://app.example"]})
    app = create_app(Cascade(FakeTier(SURE), FakeTier("x"), 4.0), IngressSettings.from_config(cfg), CascadeMetrics())
    client = TestClient(app)
    allowed = client.options("/v1/chat/completions", headers={**preflight, "origin": "https://app.example"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    denied = client.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in denied.headers


def test_body_deadline_is_a_total_bound_and_a_minimum_rate():
    # 1 s grace, then received / rate; never past the total timeout
    assert body_deadline(100.0, 0, 10.0, 1024.0) == 101.0
    assert body_deadline(100.0, 40, 10.0, 1024.0) == pytest.approx(101.0 + 40 / 1024)
    assert body_deadline(100.0, 1 << 20, 10.0, 1024.0) == 110.0
    cfg = load_serve_config(TINY)
    assert (cfg.limits.body_timeout_s, cfg.limits.body_min_rate_bps, cfg.limits.max_json_depth) == (10.0, 1024.0, 32)


# ---------------------------------------------------------------- the Serve proxy middleware, as plain ASGI


def run_guard(inner, messages, timeout_s=0.5, max_body=1000, scope_type="http"):
    """Drive ``ProxyGuard(inner)`` with client ``messages`` (None: the client waits forever); returns what it sent
    and how long it took."""
    import time

    from corea.serve.proxy_guard import ProxyGuard

    guard = ProxyGuard(inner, body_timeout_s=timeout_s, min_rate_bps=1e9, max_body_bytes=max_body)
    sent, queue = [], list(messages)

    async def receive():
        if queue:
            item = queue.pop(0)
            if item is not None:
                return item
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": scope_type, "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"content-type", b"application/json")]}
    start = time.perf_counter()
    asyncio.run(asyncio.wait_for(guard(scope, receive, send), 10))
    return sent, time.perf_counter() - start


def _status_and_error(sent):
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body)["error"]


async def _echo(scope, receive, send):
    message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": message["body"]})


def test_proxy_guard_reads_the_body_before_routing_and_cuts_slow_ones():
    called = []

    async def inner(scope, receive, send):
        called.append(scope)
        await _echo(scope, receive, send)

    sent, elapsed = run_guard(inner, [{"type": "http.request", "body": b"{" * 40, "more_body": True}, None])
    status, _, error = _status_and_error(sent)
    assert status == 408 and error["code"] == "request_timeout" and called == [] and elapsed < 2
    sent, _ = run_guard(inner, [{"type": "http.request", "body": b'{"a":', "more_body": True},
                                {"type": "http.request", "body": b"1}", "more_body": False}])
    assert sent[-1]["body"] == b'{"a":1}' and len(called) == 1  # reassembled, then routed once
    sent, _ = run_guard(inner, [{"type": "http.request", "body": b"x" * 2000, "more_body": False}])
    assert _status_and_error(sent)[0] == 413


def test_proxy_guard_turns_text_errors_and_silence_into_json():
    async def text_503(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"2")]})
        await send({"type": "http.response.body", "body": b"Back pressure: queue full"})

    async def dies(scope, receive, send):  # what the proxy does when the ingress replica died mid-request
        await receive()

    status, headers, error = _status_and_error(run_guard(text_503, [{"type": "http.request", "body": b"{}"}])[0])
    assert status == 503 and headers[b"retry-after"] == b"2" and error["message"] == "Back pressure: queue full"
    status, headers, error = _status_and_error(run_guard(dies, [{"type": "http.request", "body": b"{}"}])[0])
    assert status == 503 and error["code"] == "replica_unavailable" and headers[b"retry-after"] == b"1"
    gone = [{"type": "http.request", "body": b"{}"}, {"type": "http.disconnect"}]

    async def waits_for_disconnect(scope, receive, send):
        await receive()
        await receive()

    assert run_guard(waits_for_disconnect, gone)[0] == []  # a client that left gets nothing

    def proxy(ready: bool):
        async def app(scope, receive, send):  # Serve's proxy: 404 for every route until its routes arrive
            healthz = scope["path"] == "/-/healthz"
            status = (200 if ready else 503) if healthz else 404
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"Path '/v1' not found."})
        return app

    request = [{"type": "http.request", "body": b"{}"}]
    status, headers, error = _status_and_error(run_guard(proxy(ready=False), request)[0])
    assert status == 503 and error["code"] == "proxy_starting" and headers[b"retry-after"] == b"1"
    status, _, error = _status_and_error(run_guard(proxy(ready=True), request)[0])
    assert status == 404 and error["code"] == "not_found"
    closed = run_guard(_echo, [], scope_type="websocket")[0]
    assert closed == [{"type": "websocket.close", "code": 1008}]
