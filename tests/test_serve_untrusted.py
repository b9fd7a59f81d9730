"""Untrusted input against the serving endpoint without a cluster: request limits checked before any tier
generates, for every strategy (tiny checkpoints, in process), clients that leave mid-request, the cascade's trace,
and schemathesis against the app's own OpenAPI document. The JSON depth scan: test_serve_untrusted_json.py."""

import asyncio
import json
import logging
import os
import time

import pytest
from test_serve_hardening import counted
from test_serve_unit import TINY, FakeTier, chat, make_app

from corea.serve.cascade import Cascade, TierRejected, check_prompt
from corea.serve.config import load_serve_config
from corea.serve.ingress import IngressSettings, create_app
from corea.serve.metrics import CascadeMetrics

SURE = "\\boxed{2} \\confidence{0.9}"
UNSURE = "\\boxed{1} \\confidence{0.2}"
JSON = {"content-type": "application/json"}


# ---------------------------------------------------------------- request limits before any tier generates


class InProcessTier:
    """A ``TierServer`` in this process behind the interface of ``deployments.HandleTier``."""

    def __init__(self, server) -> None:
        self.server, self.calls = server, []

    @staticmethod
    def _out(out):
        if "error" in out:
            raise TierRejected(out["error"])
        return out

    async def generate(self, messages, params):
        self.calls.append("generate")
        return self._out(await self.server.generate(messages, params))

    async def continue_step(self, messages, prefix, params):
        self.calls.append("check" if params.get("check_only") else "step")
        return self._out(await self.server.continue_step(messages, prefix, params))

    async def stream(self, messages, params):
        self.calls.append("stream")
        async for item in self.server.stream(messages, params):
            yield self._out(item)


@pytest.fixture(scope="module")
def tiny_app(tiny_checkpoints, tmp_path_factory):
    """The cascade and the three step strategies on tiny checkpoints, in process (no Ray)."""
    from corea.collab.policy import StepPolicy
    from corea.serve.deployments import TierServer
    from corea.serve.strategies import StrategyServer

    work = tmp_path_factory.mktemp("untrusted")
    (work / "policy.json").write_text(StepPolicy(seed=0).to_json())
    cfg = load_serve_config(TINY, {
        "slm.model": str(tiny_checkpoints["slm"]), "llm.model": str(tiny_checkpoints["llm"]),
        "strategies.policy_path": str(work / "policy.json"), "strategies.max_steps": 2,
        "strategies.max_step_tokens": 2, "limits.max_tokens": 4, "limits.default_max_tokens": 2,
        "limits.max_prompt_tokens": 2048, "limits.slm_timeout_s": 60, "limits.llm_timeout_s": 60,
        "slm.batching.max_batch_size": 1, "llm.batching.max_batch_size": 1})  # a batcher is bound to one loop
    tiers = {t: InProcessTier(TierServer(getattr(cfg, t).model_dump(), t, str(work), cfg.limits.max_prompt_tokens))
             for t in ("slm", "llm")}
    metrics = CascadeMetrics()
    cascade = Cascade(tiers["slm"], tiers["llm"], cfg.cascade.cost_ratio, False, 60, 60)
    strategies = StrategyServer(tiers["slm"], tiers["llm"], cfg, metrics)
    app = create_app(cascade, IngressSettings.from_config(cfg), metrics, strategies=strategies)
    return app, tiers, metrics


@pytest.mark.parametrize("strategy", ["cascade", "steer", "stepwise_policy", "cope"])
def test_a_prompt_over_the_limits_is_a_400_before_any_tier_generates(tiny_app, strategy):
    from fastapi.testclient import TestClient

    app, tiers, _ = tiny_app
    client = TestClient(app, raise_server_exceptions=False)
    for tier in tiers.values():
        tier.calls.clear()
    long = chat(messages=[{"role": "user", "content": "x " * 27500}], corea={"strategy": strategy}, max_tokens=2)
    for stream in (False, True):
        resp = client.post("/v1/chat/completions", json={**long, "stream": stream})
        assert resp.status_code == 400, resp.text[:300]
        assert "at most 2048 are allowed" in resp.json()["error"]["message"]
    assert {c for t in tiers.values() for c in t.calls} == {"check"}  # nothing generated, on either tier
    ok = client.post("/v1/chat/completions", json=chat(corea={"strategy": strategy}, max_tokens=2))
    assert ok.status_code == 200 and ok.json()["corea"]["strategy"] == strategy, ok.text[:300]


def test_the_tier_checks_its_limits_on_every_step_too(tiny_app):
    _, tiers, _ = tiny_app
    server = tiers["slm"].server
    params = {"max_tokens": 2, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}
    long = [{"role": "user", "content": "x " * 27500}]
    out = asyncio.run(server.continue_step(long, "", params))
    assert "at most 2048 are allowed" in out["error"]
    short = [{"role": "user", "content": "hi"}]
    assert set(asyncio.run(server.continue_step(short, "", {**params, "check_only": True}))) == {"prompt_tokens"}
    huge = asyncio.run(server.continue_step(short, "", {**params, "max_tokens": 1 << 20}))
    assert "exceeds the model's context" in huge["error"]


def test_check_prompt_waits_a_bounded_time_and_only_refusals_count():
    class Checked(FakeTier):
        def __init__(self, verdict, delay=0.0):
            super().__init__(SURE)
            self.verdict, self.delay = verdict, delay

        async def continue_step(self, messages, prefix, params):
            await asyncio.sleep(self.delay)
            if isinstance(self.verdict, Exception):
                raise self.verdict
            return {"prompt_tokens": 3}

    from corea.serve.cascade import TierUnavailable

    ok, slow, quiet = Checked(None), Checked(None, delay=30), {}
    for _ in range(3):
        start = time.perf_counter()
        asyncio.run(check_prompt({"slm": ok, "llm": slow}, [], {}, wait_s=0.5, quiet=quiet))  # not waited for long
        assert time.perf_counter() - start < 2
    assert set(quiet) == {"llm"}  # ... and only once in CHECK_QUIET_S
    start = time.perf_counter()
    asyncio.run(check_prompt({"slm": ok, "llm": slow}, [], {}, wait_s=0.5, quiet=quiet))
    assert time.perf_counter() - start < 0.3
    asyncio.run(check_prompt({"slm": ok, "llm": Checked(TierUnavailable("llm", "down"))}, [], {}))
    with pytest.raises(TierRejected, match="too long"):
        asyncio.run(check_prompt({"slm": ok, "llm": Checked(TierRejected("too long"))}, [], {}))


# ---------------------------------------------------------------- clients that leave


async def _drive(app, body: dict, *, leave: str, spec: str = "2.3"):
    """One POST through the ASGI app by a client that leaves: "stream" after the first streamed chunk (a
    disconnect for ASGI 2.3 servers, a failing send for 2.4 ones), "cancel" Serve's way (the request's task
    cancelled) once the response started or, with "cancel-wait", while the route waits on a tier, "body" before
    its body is complete."""
    raw = json.dumps(body).encode()
    first_chunk, sent = asyncio.Event(), []
    inbox = [{"type": "http.request", "body": raw[:10], "more_body": True}] + (
        [] if leave == "body" else [{"type": "http.request", "body": raw[10:], "more_body": False}])

    async def receive():
        if inbox:
            return inbox.pop(0)
        if leave != "body":
            await first_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if first_chunk.is_set() and spec == "2.4":
            raise OSError("connection reset")
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    task = asyncio.create_task(app(scope, receive, send))
    if leave.startswith("cancel"):
        if leave == "cancel":
            await first_chunk.wait()
        else:
            await asyncio.sleep(0.3)
        task.cancel()
    try:
        await asyncio.wait_for(task, 10)
    except asyncio.CancelledError:
        pass
    return sent


@pytest.mark.parametrize("leave, spec, stream", [("stream", "2.3", True), ("stream", "2.4", True),
                                                 ("cancel", "2.3", True), ("cancel-wait", "2.3", False),
                                                 ("body", "2.3", False)])
def test_a_client_that_leaves_is_counted_cancelled_never_an_error(caplog, leave, spec, stream):
    class Trickling(FakeTier):  # an LLM that streams one delta every 50 ms
        async def stream(self, messages, params):
            async for item in super().stream(messages, params):
                await asyncio.sleep(0.05)
                yield item

    slow_llm = Trickling("\\boxed{4} and so on " * 20, delay=0.0 if leave != "cancel-wait" else 5.0)
    client, metrics = make_app(FakeTier(UNSURE), slow_llm)
    with caplog.at_level(logging.INFO):
        sent = asyncio.run(_drive(client.app, chat(stream=stream, corea={"threshold": 0.9}), leave=leave, spec=spec))
    assert not any(m.get("status") == 500 for m in sent)
    assert counted(client, "cancelled") == 1 and counted(client, "error") == 0 and counted(client, "ok") == 0
    assert 'corea_requests_total{model="%s",outcome="cancelled"' % ("unknown" if leave == "body" else
                                                                    "corea-cascade") in client.get("/metrics").text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert any("client left" in r.getMessage() for r in caplog.records)


def test_a_complete_response_is_not_counted_cancelled():
    client, _ = make_app(FakeTier(SURE), FakeTier("x"))
    sent = asyncio.run(_drive(client.app, chat(stream=True), leave="none"))
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert counted(client, "cancelled") == 0 and counted(client, "ok") == 1


# ---------------------------------------------------------------- the cascade's trace


def test_cascade_answers_carry_strategy_and_trace_as_the_other_strategies():
    client, _ = make_app(FakeTier(UNSURE, 20, 6), FakeTier("\\boxed{4}", 20, 9))
    kept = client.post("/v1/chat/completions", json=chat(corea={"threshold": 0.1}))
    deferred = client.post("/v1/chat/completions", json=chat(corea={"threshold": 0.5}))
    assert kept.headers["x-corea-strategy"] == deferred.headers["x-corea-strategy"] == "cascade"
    meta = kept.json()["corea"]
    assert meta["strategy"] == "cascade" and meta["llm_steps"] == 0
    assert meta["trace"] == [{"tier": "slm", "role": "answer", "tokens": 6, "prompt_tokens": 20, "confidence": 0.2,
                              "score": 0.2, "accepted": True}]
    meta = deferred.json()["corea"]
    assert meta["llm_steps"] == 1 and [(c["tier"], c["accepted"]) for c in meta["trace"]] == [("slm", False),
                                                                                            ("llm", True)]
    assert meta["trace"][1] == {"tier": "llm", "role": "answer", "tokens": 9, "prompt_tokens": 20,
                                "confidence": None, "score": None, "accepted": True}
    with client.stream("POST", "/v1/chat/completions", json=chat(stream=True, corea={"threshold": 0.5})) as resp:
        final = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")][-1]
    assert final["corea"]["strategy"] == "cascade" and len(final["corea"]["trace"]) == 2
    forced = client.post("/v1/chat/completions", json=chat(model="corea-llm")).json()["corea"]
    assert forced["strategy"] is None and [c["tier"] for c in forced["trace"]] == ["llm"]


# ---------------------------------------------------------------- schemathesis against the app's OpenAPI document

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)


@pytest.fixture(scope="module")
def api_schema(tiny_app):
    app, _, _ = tiny_app
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def check_openai_errors(response) -> None:
    """The rule for every response a client can cause: no 5xx but a JSON 503, every error an OpenAI error body."""
    status, ctype = response.status_code, response.headers.get("content-type", [""])
    ctype = ctype[0] if isinstance(ctype, list) else ctype
    assert status < 500 or status == 503, (status, response.text[:300])
    if status >= 400:
        assert ctype.startswith("application/json"), (status, ctype)
        error = json.loads(response.text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error


SCALE = int(os.environ.get("COREA_SCHEMATHESIS_SCALE", "1"))  # more examples per operation: a longer search
OPERATIONS = [("/v1/chat/completions", "POST", "positive", 40), ("/v1/chat/completions", "POST", "negative", 40),
              ("/v1/models", "GET", "positive", 3), ("/healthz", "GET", "positive", 5), ("/healthz", "GET", "negative", 10),
              ("/metrics", "GET", "positive", 2)]


@pytest.mark.parametrize("path, method, mode, examples", OPERATIONS)
def test_the_api_against_its_own_openapi_document(api_schema, path, method, mode, examples):
    """schemathesis's Python API (its pytest plugin needs pytest < 9): cases generated from the app's own document,
    valid ones (positive) and invalid ones (negative), sent to the app in process with the tiny tiers."""
    from hypothesis import given

    from schemathesis.generation import GenerationMode

    strategy = api_schema[path][method].as_strategy(GenerationMode(mode))

    @settings(max_examples=examples * SCALE, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case):
        response = case.call()
        check_openai_errors(response)
        case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                                  response_schema_conformance, negative_data_rejection])

    run()


def test_openapi_document_describes_the_chat_request(tiny_app):
    from fastapi.testclient import TestClient

    doc = TestClient(tiny_app[0]).get("/openapi.json").json()
    post = doc["paths"]["/v1/chat/completions"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatRequest")
    request = doc["components"]["schemas"]["ChatRequest"]
    assert request["required"] == ["model", "messages"] and "corea" in request["properties"]
    assert {"400", "401", "404", "408", "413", "415", "503"} <= set(post["responses"])
    assert "422" not in json.dumps(doc["paths"])
    assert set(request["properties"]["model"]["enum"]) == {"corea-cascade", "corea-slm", "corea-llm"}
    assert request["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 4
