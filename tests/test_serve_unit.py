"""Serving without a cluster: config validation, the cascade rule, the HTTP API (FastAPI test client with
in-process fake tiers), metrics, and the tier server's batching on a tiny checkpoint."""

import asyncio
import json
import os
import time
from pathlib import Path

import openai
import pytest
import yaml
from fastapi.testclient import TestClient

from corea.cost import token_cost
from corea.protocol import INSTRUCTION
from corea.serve.app import build_app, prepare
from corea.serve.cascade import Cascade, TierRejected, TierUnavailable
from corea.serve.config import ConfigError, load_serve_config
from corea.serve.ingress import IngressSettings, create_app, key_digest
from corea.serve.metrics import CascadeMetrics
from corea.serve.openai_schema import with_instruction

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "serve-tiny-cpu.yaml"
P5EN = ROOT / "configs" / "serve-p5en.yaml"
USER = [{"role": "user", "content": "What is 1 + 1?"}]


class FakeTier:
    """A tier answering ``text`` with fixed token counts; optionally slow, down or rejecting."""

    def __init__(self, text, n_in=10, n_out=5, delay=0.0, down=False, reject=False):
        self.text, self.n_in, self.n_out, self.delay, self.down, self.reject = text, n_in, n_out, delay, down, reject
        self.calls = []

    async def _enter(self, messages, params):
        self.calls.append((messages, params))
        await asyncio.sleep(self.delay)
        if self.down:
            raise TierUnavailable("llm", "down")
        if self.reject:
            raise TierRejected("prompt too long")

    async def generate(self, messages, params):
        await self._enter(messages, params)
        return {"text": self.text, "prompt_tokens": self.n_in, "completion_tokens": self.n_out, "finish_reason": "stop"}

    async def stream(self, messages, params):
        await self._enter(messages, params)
        for i in range(0, len(self.text), 4):
            yield {"delta": self.text[i : i + 4]}
        yield {"usage": {"prompt_tokens": self.n_in, "completion_tokens": self.n_out}, "finish_reason": "stop"}


def make_app(slm, llm, keys=(), degrade=False, llm_timeout=5.0, **limits):
    cfg = load_serve_config(TINY, {"cascade.degrade_to_slm": degrade, "limits.llm_timeout_s": llm_timeout,
                                   **{f"limits.{k}": v for k, v in limits.items()}})
    cascade = Cascade(slm, llm, cfg.cascade.cost_ratio, degrade, cfg.limits.slm_timeout_s, llm_timeout)
    metrics = CascadeMetrics()
    app = create_app(cascade, IngressSettings.from_config(cfg, [key_digest(k) for k in keys]), metrics)
    return TestClient(app, raise_server_exceptions=False), metrics


def chat(**body):
    return {"model": "corea-cascade", "messages": USER, "temperature": 0.0, "max_tokens": 16, **body}


# ---------------------------------------------------------------- config


def test_shipped_configs_validate_and_map_to_serve_options():
    tiny, p5en = load_serve_config(TINY), load_serve_config(P5EN)
    assert tiny.slm.model == "tiny:slm-confident" and tiny.llm.backend == "transformers"
    llm = p5en.llm.serve_options("LLM")
    assert llm["ray_actor_options"] == {"num_cpus": 16.0, "num_gpus": 4.0, "accelerator_type": "H200"}
    assert llm["autoscaling_config"]["max_replicas"] == 4 and llm["max_ongoing_requests"] == 96
    assert p5en.llm.load_options()["tensor_parallel_size"] == 4 and p5en.llm.load_options()["async_engine"]
    assert p5en.slm.serve_options("SLM")["ray_actor_options"]["num_gpus"] == 1.0
    assert p5en.cascade.cost_ratio == pytest.approx(32 / 7)


@pytest.mark.parametrize("override, field", [
    ({"llm.tensor_parallel_size": 2}, "llm: Value error, tensor_parallel_size > 1 needs backend: vllm"),
    ({"slm.autoscaling.min_replicas": 3}, "slm.autoscaling: Value error, min_replicas (3) exceeds"),
    ({"cascade.threshold": 1.5}, "cascade.threshold: Input should be less than or equal to 1.1"),
    ({"ingress.max_ongoing_requests": 0}, "ingress.max_ongoing_requests: Input should be greater than or equal"),
    ({"slm.num_replicas": 2}, "slm: Value error, set either num_replicas or autoscaling"),
    ({"llm.gpus": 1}, "llm.gpus: Extra inputs are not permitted"),
    ({"limits.default_max_tokens": 100000}, "limits: Value error, default_max_tokens (100000) exceeds max_tokens"),
])
def test_invalid_config_names_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_serve_config(TINY, override)
    assert field in str(err.value) and str(TINY) in str(err.value)


def test_vllm_tier_must_own_its_tensor_parallel_gpus():
    with pytest.raises(ConfigError, match=r"llm: Value error, resources.num_gpus \(2\) must equal tensor_parallel"):
        load_serve_config(P5EN, {"llm.resources.num_gpus": 2})


def test_serve_yaml_builds_the_bound_graph(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "configs/serve-tiny-cpu.serve.yaml").read_text()))
    (entry,) = schema.applications
    assert entry.import_path == "corea.serve.app:build_app"
    monkeypatch.chdir(ROOT)
    app = build_app(entry.args)
    ingress = app._bound_deployment
    slm, llm, cfg = ingress.init_args
    assert ingress.name == "CascadeIngress"
    assert slm._bound_deployment.name == "SLM" and llm._bound_deployment.name == "LLM"
    assert slm._bound_deployment.ray_actor_options["num_cpus"] == 0.5
    assert llm._bound_deployment._deployment_config.autoscaling_config.max_replicas == 2
    assert ingress.max_ongoing_requests == 256
    assert Path(cfg["work_dir"]).is_absolute()


def test_api_keys_come_from_the_environment_as_digests(monkeypatch):
    cfg = load_serve_config(P5EN)
    monkeypatch.delenv("COREA_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="auth.api_keys_env: the environment variable COREA_API_KEYS is unset"):
        prepare(cfg)
    monkeypatch.setenv("COREA_API_KEYS", "k1, k2")
    auth = prepare(cfg).auth
    assert auth.api_keys_env is None and sorted(auth.api_key_sha256) == sorted([key_digest("k1"), key_digest("k2")])
    assert "COREA_API_KEYS" not in os.environ  # consumed: a Ray cluster started afterwards never sees it
    monkeypatch.setenv("COREA_API_KEYS", "k1, k2")
    direct = build_app({"config": str(P5EN), "app": "direct_slm"})._bound_deployment
    assert direct.name == "SLMDirect" and direct.ray_actor_options["accelerator_type"] == "H200"


def test_instruction_is_appended_to_the_last_user_message_once():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": " q2 "}]
    out = with_instruction(msgs)
    assert out[1]["content"] == "q1" and out[3]["content"] == f"q2\n{INSTRUCTION}"
    assert with_instruction(out) == out and msgs[3]["content"] == " q2 "


# ---------------------------------------------------------------- the cascade rule


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("text, tau, tier", [
    ("\\boxed{2} \\confidence{0.9}", 0.9, "slm"),  # c >= tau stays
    ("\\boxed{2} \\confidence{0.9}", 0.91, "llm"),
    ("\\boxed{2} \\confidence{0.0}", 0.0, "slm"),
    ("\\boxed{2} \\confidence{1.0}", 1.1, "llm"),  # 1.1 defers everything
    ("\\boxed{2} no confidence", 0.0, "llm"),  # a missing confidence always defers
    ("\\boxed{2} \\confidence{1.5}", 0.0, "llm"),  # invalid confidence = missing
])
def test_threshold_rule_and_costs(text, tau, tier):
    slm, llm = FakeTier(text, 30, 7), FakeTier("\\boxed{3}", 30, 11)
    result = run(Cascade(slm, llm, 32 / 7).complete(USER, {}, "cascade", tau, "corea-cascade"))
    assert result.tier == tier and result.deferred == (tier == "llm")
    expected = float(token_cost(30, 7)) + (float(token_cost(30, 11, 32 / 7)) if tier == "llm" else 0.0)
    assert result.cost == pytest.approx(expected) and len(llm.calls) == (tier == "llm")
    assert result.usage() == (30 + 30 * (tier == "llm"), 7 + 11 * (tier == "llm"))


def test_forced_tiers_call_one_model():
    slm, llm = FakeTier("\\confidence{0.1}"), FakeTier("x")
    r = run(Cascade(slm, llm, 2.0).complete(USER, {}, "slm", 0.5, "corea-slm"))
    assert (r.tier, r.confidence, r.deferred, len(llm.calls)) == ("slm", 0.1, False, 0)
    r = run(Cascade(slm, llm, 2.0).complete(USER, {}, "llm", 0.5, "corea-llm"))
    assert (r.tier, r.slm, len(slm.calls)) == ("llm", None, 1)


def test_llm_down_or_slow_is_unavailable_or_degrades():
    slm = FakeTier("\\confidence{0.1}")
    with pytest.raises(TierUnavailable, match="LLM tier is unavailable"):
        run(Cascade(slm, FakeTier("x", down=True), 2.0).complete(USER, {}, "cascade", 0.5, "m"))
    start = time.perf_counter()
    with pytest.raises(TierUnavailable, match="no answer within 0.2 s"):
        run(Cascade(slm, FakeTier("x", delay=5), 2.0, llm_timeout_s=0.2).complete(USER, {}, "cascade", 0.5, "m"))
    assert time.perf_counter() - start < 2
    r = run(Cascade(slm, FakeTier("x", down=True), 2.0, degrade_to_slm=True).complete(USER, {}, "cascade", 0.5, "m"))
    assert (r.tier, r.degraded, r.deferred, r.llm) == ("slm", True, True, None)


def test_stream_holds_the_slm_answer_and_streams_the_llm_live():
    async def collect(cascade, tau):
        plan = await cascade.open_stream(USER, {}, "cascade", tau, "m")
        return plan.result, [d async for d in plan.deltas()]

    slm, llm = FakeTier("\\boxed{2} \\confidence{0.9}", 10, 12), FakeTier("abcdefghij", 10, 3)
    result, deltas = run(collect(Cascade(slm, llm, 2.0), 0.5))
    assert deltas == [slm.text] and result.tier == "slm" and result.llm is None
    result, deltas = run(collect(Cascade(slm, llm, 2.0), 1.0))
    assert deltas == ["abcd", "efgh", "ij"] and result.tier == "llm" and result.llm.completion_tokens == 3
    assert result.cost == pytest.approx(float(token_cost(10, 12) + token_cost(10, 3, 2.0)))


# ---------------------------------------------------------------- the HTTP API


def test_openai_client_plain_and_streaming_against_the_app():
    slm, llm = FakeTier("\\boxed{2} \\confidence{0.8}", 20, 6), FakeTier("\\boxed{4}", 20, 9)
    client, metrics = make_app(slm, llm)
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client)
    assert {m.id for m in oa.models.list()} == {"corea-cascade", "corea-slm", "corea-llm"}
    raw = oa.chat.completions.with_raw_response.create(model="corea-cascade", messages=USER,
                                                       extra_body={"corea": {"threshold": 0.7}})
    resp = raw.parse()
    assert resp.choices[0].message.content == slm.text and resp.usage.total_tokens == 26
    meta = resp.model_extra["corea"]
    assert meta["tier"] == "slm" and meta["confidence"] == 0.8 and meta["threshold"] == 0.7 and meta["answer"] == "2"
    assert raw.headers["x-corea-tier"] == "slm" and raw.headers["x-corea-deferred"] == "false"
    assert float(raw.headers["x-corea-cost"]) == pytest.approx(20 + 4 * 6)
    assert slm.calls[0][0][-1]["content"].endswith(INSTRUCTION) and slm.calls[0][1]["temperature"] == 0.6
    assert slm.calls[0][1]["min_tokens"] == 0
    oa.chat.completions.create(model="corea-slm", messages=USER, max_tokens=12, extra_body={"min_tokens": 12})
    assert slm.calls[-1][1]["min_tokens"] == 12 and slm.calls[-1][1]["max_tokens"] == 12  # vLLM's extension

    chunks = list(oa.chat.completions.create(model="corea-cascade", messages=USER, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"corea": {"threshold": 0.9}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == llm.text and chunks[-1].usage.total_tokens == 20 + 6 + 20 + 9
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert final.model_extra["corea"]["deferred"] is True and final.model_extra["corea"]["tier"] == "llm"
    page = client.get("/metrics").text
    assert 'corea_requests_total{model="corea-cascade",outcome="ok",tier="slm"} 1.0' in page
    assert 'corea_requests_total{model="corea-cascade",outcome="ok",tier="llm"} 1.0' in page
    assert "corea_deferral_rate 0.5" in page and 'corea_cost_total{tier="llm"}' in page


def test_sse_wire_format_ends_with_done():
    client, _ = make_app(FakeTier("\\confidence{0.9}"), FakeTier("x"))
    with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-corea-tier"] == "slm"
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"messages": USER}).encode(), 400, "model"),
    (json.dumps(chat(messages=[])).encode(), 400, "messages"),
    (json.dumps(chat(messages=[{"role": "system", "content": "x"}])).encode(), 400, "messages"),
    (json.dumps(chat(messages=[{"role": "user", "content": 5}])).encode(), 400, "messages.0.content.str"),
    (json.dumps(chat(messages=[{"role": "robot", "content": "x"}])).encode(), 400, "messages.0.role"),
    (json.dumps(chat(temperature="hot")).encode(), 400, "temperature"),
    (json.dumps(chat(stream="yes")).encode(), 400, "stream"),
    (json.dumps(chat(n=2)).encode(), 400, "n"),
    (json.dumps(chat(max_tokens=10**6)).encode(), 400, "max_tokens"),
    (json.dumps(chat(max_tokens=0)).encode(), 400, "max_tokens"),
    (json.dumps(chat(max_tokens=16, min_tokens=17)).encode(), 400, "min_tokens"),
    (json.dumps(chat(min_tokens=-1)).encode(), 400, "min_tokens"),
    (json.dumps(chat(corea={"threshold": 2})).encode(), 400, "corea.threshold"),
    (json.dumps(chat(corea={"tau": 0.5})).encode(), 400, "corea.tau"),
    (json.dumps(chat(model="gpt-9")).encode(), 404, "model"),
    (json.dumps(chat(messages=[{"role": "user", "content": "x" * 70000}])).encode(), 413, None),
])
def test_malformed_requests_get_openai_style_4xx(body, status, param):
    client, metrics = make_app(FakeTier("\\confidence{0.9}"), FakeTier("x"), max_body_bytes=65536)
    resp = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert 'outcome="client_error"' in client.get("/metrics").text


def test_unknown_route_and_method_are_json_4xx():
    client, _ = make_app(FakeTier("x"), FakeTier("x"))
    assert client.get("/v2/nothing").status_code == 404 and "error" in client.get("/v2/nothing").json()
    assert client.get("/v1/chat/completions").status_code == 405
    assert client.get("/healthz?tiers=maybe").status_code == 400


def test_api_keys():
    client, _ = make_app(FakeTier("\\confidence{0.9}"), FakeTier("x"), keys=["sesame"])
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic sesame"}):
        resp = client.post("/v1/chat/completions", json=chat(), headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    ok = client.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer sesame"})
    assert ok.status_code == 200
    assert client.get("/healthz").status_code == 200  # probes stay open


def test_llm_down_gives_503_or_a_flagged_slm_answer():
    unsure = FakeTier("\\boxed{1} \\confidence{0.2}")
    client, _ = make_app(unsure, FakeTier("x", down=True))
    resp = client.post("/v1/chat/completions", json=chat())
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "tier_unavailable"
    assert "LLM tier is unavailable" in resp.json()["error"]["message"] and resp.headers["retry-after"]
    with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as stream:
        assert stream.status_code == 503
    client, _ = make_app(unsure, FakeTier("x", down=True), degrade=True)
    resp = client.post("/v1/chat/completions", json=chat())
    assert resp.status_code == 200 and resp.headers["x-corea-degraded"] == "true"
    assert resp.json()["corea"]["degraded"] and resp.json()["choices"][0]["message"]["content"] == unsure.text
    client, _ = make_app(FakeTier("x", reject=True), FakeTier("x"))
    assert client.post("/v1/chat/completions", json=chat()).status_code == 400


def test_pathological_model_output_is_parsed_in_linear_time():
    nasty = "\\boxed{" * 200_000 + "\\confidence{" * 100_000 + "}" * 50_000
    client, _ = make_app(FakeTier(nasty), FakeTier("ok"))
    start = time.perf_counter()
    resp = client.post("/v1/chat/completions", json=chat())
    assert resp.status_code == 200 and resp.json()["corea"]["deferred"] is True
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------- the tier server, in process


def test_tier_server_batches_and_isolates_a_bad_request(tiny_checkpoints, tmp_path):
    from corea.serve.deployments import TierServer

    tier = load_serve_config(TINY, {"slm.model": str(tiny_checkpoints["slm"])}).slm.model_dump()
    server = TierServer(tier, "slm", str(tmp_path))
    params = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}

    async def many():
        prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
        huge = [{"role": "user", "content": "word " * 40000}]
        outs = await asyncio.gather(*(server.generate(p, params) for p in prompts + [huge]))
        streamed = [item async for item in server.stream(prompts[0], params)]
        return outs, streamed

    outs, streamed = asyncio.run(many())
    assert all(o["completion_tokens"] <= 8 and o["prompt_tokens"] > 0 for o in outs[:6])
    assert "exceeds the model's context" in outs[6]["error"]
    assert "".join(i.get("delta", "") for i in streamed) == outs[0]["text"]
    assert streamed[-1]["usage"]["prompt_tokens"] == outs[0]["prompt_tokens"]


def test_micro_batcher_groups_concurrent_calls_and_propagates_errors():
    from corea.collab.batching import MicroBatcher

    batches = []

    async def run_batch(items):
        batches.append(list(items))
        await asyncio.sleep(0.01)
        if "bad" in items:
            raise ValueError("bad item")
        return [i * 2 for i in items]

    async def main():
        batcher = MicroBatcher(run_batch, max_size=4, wait_s=0.05)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        with pytest.raises(ValueError, match="bad item"):
            await batcher.submit("bad")
        return results

    assert asyncio.run(main()) == [2 * i for i in range(10)]
    assert [len(b) for b in batches] == [4, 4, 2, 1]


def test_cli_parser_and_detach_needs_a_cluster(monkeypatch):
    import argparse
    import subprocess
    import sys

    from corea.serve.cli import add_serve_parser, run_serve

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--config", str(TINY), "--detach", "--set", "http.port=8001"])
    assert args.blocking is False and args.set == ["http.port=8001"] and args.func is run_serve
    assert parser.parse_args(["serve", "--config", "x"]).blocking is True
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="--detach needs a running Ray cluster"):
        run_serve(args)
    with pytest.raises(ValueError, match="--set takes KEY=VALUE"):
        run_serve(parser.parse_args(["serve", "--config", str(TINY), "--set", "oops"]))
    job = subprocess.run([sys.executable, str(ROOT / "ray_jobs/serve_cascade.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert job.returncode == 0 and "--detach" in job.stdout


def test_per_request_rule_matches_the_offline_cost_model():
    from corea.cost import defers

    confidences = [None, 0.0, 0.2, 0.5, 0.9, 1.0]
    for tau in (0.0, 0.2, 0.5, 0.95, 1.1):
        for c in confidences:
            text = "\\boxed{1}" + ("" if c is None else f" \\confidence{{{c}}}")
            cascade = Cascade(FakeTier(text, 13, 5), FakeTier("y", 13, 9), 32 / 7)
            r = run(cascade.complete(USER, {}, "cascade", tau, "m"))
            assert r.deferred == bool(defers([c], tau)[0])
            assert r.cost == pytest.approx(float(token_cost(13, 5) + (token_cost(13, 9, 32 / 7) if r.deferred else 0)))
