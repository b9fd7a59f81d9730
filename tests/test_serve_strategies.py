"""Step-level and plan-based strategies served end to end: tiny checkpoints on a local Ray cluster, the ingress
driving the SLM and LLM deployments through their handles, queried with the unchanged `openai` client.

The SLM is `tiny:slm-confident` (answers "What is a + b?" with `\\boxed{2} \\confidence{0.9}` in one step, with
greedy decoding); the LLM is a random tiny checkpoint. Thresholds 0 and 1.1 force each rule's two paths.
One application serves every test of this module.
"""

from types import SimpleNamespace

import httpx
import openai
import pytest

from corea.serve.tiny import CONFIDENT_ANSWER, CONFIDENT_QUESTIONS, confident_slm_path, make_confident_slm

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from support import ROOT, delta, free_port, metrics, wait_running, write_quiet_policy  # noqa: E402

EASY = CONFIDENT_QUESTIONS[0]
RATIO = 32 / 7  # the LLM/SLM size ratio of configs/serve-tiny-cpu.yaml


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from corea.serve.app import deploy
    from corea.serve.config import load_serve_config

    work = tmp_path_factory.mktemp("serve-strategies")
    make_confident_slm(confident_slm_path(work))
    write_quiet_policy(work / "policy.json")  # tau 0 always calls the LLM, tau 0.5 never
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    cfg = load_serve_config(ROOT / "configs/serve-tiny-cpu.yaml", {
        "work_dir": str(work), "http.port": port, "strategies.policy_path": str(work / "policy.json"),
        "slm.autoscaling.max_replicas": 1, "llm.autoscaling.max_replicas": 1, "limits.default_max_tokens": 24,
        "strategies.max_step_tokens": 12, "strategies.max_steps": 4,
        "strategies.model_ids": {"corea-steer": "steer"},
    })
    urls = deploy(cfg)
    for name in urls:
        wait_running(name)
    client = openai.OpenAI(base_url=f"{urls['corea']}/v1", api_key="unused", max_retries=0, timeout=120)
    yield SimpleNamespace(url=urls["corea"], client=client)
    serve.shutdown()
    ray.shutdown()


def ask(app, strategy=None, tau=None, model="corea-cascade", question=EASY, **kw):
    corea = {k: v for k, v in (("strategy", strategy), ("threshold", tau)) if v is not None}
    raw = app.client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24,
        extra_body={"corea": corea} if corea else None, **kw)
    return raw.parse(), raw.headers


def _check_sums(meta, headers):
    trace = meta["trace"]
    for tier in ("slm", "llm"):
        calls = [c for c in trace if c["tier"] == tier]
        assert meta["usage"][tier]["completion_tokens"] == sum(c["tokens"] for c in calls)
        assert meta["usage"][tier]["prompt_tokens"] == sum(c["prompt_tokens"] for c in calls)
        n = meta["usage"][tier]
        ratio = RATIO if tier == "llm" else 1.0
        assert meta["cost"][tier] == pytest.approx(ratio * (n["prompt_tokens"] + 4 * n["completion_tokens"]))
        assert int(headers[f"x-corea-{tier}-tokens"]) == n["prompt_tokens"] + n["completion_tokens"]
    assert float(headers["x-corea-cost"]) == pytest.approx(meta["cost"]["total"], abs=0.05)
    assert meta["cost"]["total_cached"] <= meta["cost"]["total"]
    assert int(headers["x-corea-llm-steps"]) == meta["llm_steps"] == sum(
        1 for c in trace if c["tier"] == "llm" and c["accepted"])


def test_steer_keeps_confident_slm_steps(app):
    reply, headers = ask(app, "steer", 0.0)
    meta = reply.model_extra["corea"]
    assert reply.choices[0].message.content == CONFIDENT_ANSWER
    assert meta["strategy"] == "steer" and headers["x-corea-strategy"] == "steer"
    assert [(c["tier"], c["role"], c["accepted"]) for c in meta["trace"]] == [("slm", "step", True)]
    assert 0.5 < meta["trace"][0]["confidence"] <= 1.0
    _check_sums(meta, headers)


def test_steer_hands_steps_to_the_llm_below_the_threshold(app):
    reply, headers = ask(app, "steer", 1.1)
    meta = reply.model_extra["corea"]
    trace = meta["trace"]
    assert trace[0]["tier"] == "slm" and not trace[0]["accepted"] and trace[0]["role"] == "draft"
    assert trace[1]["tier"] == "llm" and trace[1]["accepted"]
    assert meta["llm_steps"] >= 1 and meta["handoffs"] >= 1
    assert reply.usage.completion_tokens == sum(c["tokens"] for c in trace)
    _check_sums(meta, headers)
    assert meta["latency_ms"]["routing_overhead"] >= 0


def test_model_id_selects_the_strategy(app):
    reply, headers = ask(app, model="corea-steer", tau=0.0)
    assert reply.model_extra["corea"]["strategy"] == "steer" and headers["x-corea-threshold"] == "0"


def test_stepwise_policy_threshold_on_p_call_llm(app):
    never, _ = ask(app, "stepwise_policy", 0.5)
    assert [c["tier"] for c in never.model_extra["corea"]["trace"]] == ["slm"]
    assert never.choices[0].message.content == CONFIDENT_ANSWER
    always, headers = ask(app, "stepwise_policy", 0.0)
    meta = always.model_extra["corea"]
    assert all(c["tier"] == "llm" for c in meta["trace"] if c["accepted"]) and meta["llm_steps"] >= 1
    _check_sums(meta, headers)


def test_cope_runs_its_stages(app):
    reply, headers = ask(app, "cope", 1.1)
    meta = reply.model_extra["corea"]
    assert [(c["tier"], c["role"]) for c in meta["trace"]] == [
        ("slm", "plan"), ("slm", "execute"), ("llm", "plan"), ("slm", "execute"), ("llm", "execute")]
    assert [c["accepted"] for c in meta["trace"]] == [False, False, True, False, True]
    _check_sums(meta, headers)


def test_streamed_steps_concatenate_to_the_answer(app):
    stream = app.client.chat.completions.create(
        model="corea-cascade", messages=[{"role": "user", "content": EASY}], temperature=0, max_tokens=24,
        stream=True, extra_body={"corea": {"strategy": "steer", "threshold": 1.1}})
    parts, meta = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        meta = (chunk.model_extra or {}).get("corea") or meta
    assert meta is not None and meta["strategy"] == "steer"
    accepted = [c for c in meta["trace"] if c["accepted"]]
    assert len(parts) == len(accepted) >= 1  # one chunk per accepted step
    plain, _ = ask(app, "steer", 1.1)
    assert "".join(parts) == plain.choices[0].message.content  # greedy: the same steps as the plain request


def test_bad_strategy_options_are_400(app):
    for corea in ({"strategy": "nope"}, {"strategy": "steer", "threshold": 2.0}, {"strategy": 3}):
        r = httpx.post(f"{app.url}/v1/chat/completions", json={
            "model": "corea-cascade", "messages": [{"role": "user", "content": EASY}], "corea": corea}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"].startswith("corea")


def test_prometheus_counts_llm_steps_and_cost_per_strategy(app):
    before = metrics(app.url)
    reply, _ = ask(app, "steer", 1.1)
    after = metrics(app.url)
    meta = reply.model_extra["corea"]
    assert delta(after, before, "corea_strategy_requests_total", strategy="steer", outcome="ok") == 1
    assert delta(after, before, "corea_llm_steps_per_request_sum", strategy="steer") == meta["llm_steps"]
    assert delta(after, before, "corea_strategy_cost_total", strategy="steer") == pytest.approx(
        meta["cost"]["total"])
