"""The cascade on a local Ray cluster with tiny checkpoints, queried over HTTP with the `openai` client.

The SLM is the tiny SLM fine-tuned for a few seconds to state a confidence (0.9 on "What is a + b?",
0.2 on "Prove that ..."), so greedy decoding makes every routing decision deterministic. One application
(deployed as `corea serve` does, with the standalone SLM app beside it) serves every test but the outage test,
which deploys the Serve YAML's application declaratively so that the LLM alone can be taken down and back.
"""

import asyncio
import json
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import yaml

from corea.serve.tiny import (
    CONFIDENT_ANSWER,
    CONFIDENT_QUESTIONS,
    UNSURE_ANSWER,
    UNSURE_QUESTIONS,
    confident_slm_path,
    make_confident_slm,
)

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from support import ROOT, delta, free_port, metrics, wait_running  # noqa: E402

EASY, HARD = CONFIDENT_QUESTIONS[0], UNSURE_QUESTIONS[0]
RATIO = 32 / 7


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    make_confident_slm(confident_slm_path(work))  # built once; the replicas find it there
    if ray.is_initialized():  # a cluster left over by an earlier module
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield SimpleNamespace(work=work, port=free_port())
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def app(cluster):
    from corea.serve.app import deploy
    from corea.serve.config import load_serve_config

    cfg = load_serve_config(ROOT / "configs/serve-tiny-cpu.yaml", {
        "work_dir": str(cluster.work), "http.port": cluster.port, "direct_slm": {},
        "slm.autoscaling.max_replicas": 1, "llm.autoscaling.max_replicas": 1,
        "limits.max_body_bytes": 65536, "limits.default_max_tokens": 24,
    })
    urls = deploy(cfg)
    for name in urls:
        wait_running(name)
    return SimpleNamespace(url=urls["corea"], direct=urls["corea-slm-direct"], cfg=cfg)


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, question, tau=None, model="corea-cascade", **kw):
    extra = {"corea": {"threshold": tau}} if tau is not None else None
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24,
        extra_body=extra, **kw)
    return raw.parse(), raw.headers


def test_low_threshold_keeps_answers_on_the_slm(client, app):
    assert {m.id for m in client.models.list()} == {"corea-cascade", "corea-slm", "corea-llm"}
    for tau in (0.5, 0.9):
        resp, headers = ask(client, EASY, tau)
        meta = resp.model_extra["corea"]
        assert resp.choices[0].message.content == CONFIDENT_ANSWER
        assert (meta["tier"], meta["confidence"], meta["deferred"], meta["threshold"]) == ("slm", 0.9, False, tau)
        assert meta["usage"]["llm"] is None and meta["answer"] == "2"
        n_in, n_out = resp.usage.prompt_tokens, resp.usage.completion_tokens
        assert meta["cost"]["total"] == pytest.approx(n_in + 4 * n_out)
        assert headers["x-corea-tier"] == "slm" and headers["x-corea-confidence"] == "0.9"
        assert headers["x-corea-deferred"] == "false"
        assert float(headers["x-corea-cost"]) == pytest.approx(n_in + 4 * n_out, abs=0.1)
    resp, _ = ask(client, HARD, 0.0)  # c = 0.2 >= 0
    assert resp.model_extra["corea"]["tier"] == "slm" and resp.choices[0].message.content == UNSURE_ANSWER


def test_threshold_above_confidence_defers_to_the_llm(client):
    for question, tau, confidence in ((HARD, None, 0.2), (HARD, 0.5, 0.2), (EASY, 1.1, 0.9)):
        resp, headers = ask(client, question, tau)
        meta = resp.model_extra["corea"]
        assert (meta["tier"], meta["deferred"], meta["confidence"]) == ("llm", True, confidence)
        slm, llm = meta["usage"]["slm"], meta["usage"]["llm"]
        assert resp.usage.prompt_tokens == slm["prompt_tokens"] + llm["prompt_tokens"]
        assert resp.usage.completion_tokens == slm["completion_tokens"] + llm["completion_tokens"] <= 24 + 24
        assert llm["prompt_tokens"] == slm["prompt_tokens"]  # the same messages, instruction included
        c_slm = slm["prompt_tokens"] + 4 * slm["completion_tokens"]
        c_llm = RATIO * (llm["prompt_tokens"] + 4 * llm["completion_tokens"])
        assert meta["cost"]["slm"] == pytest.approx(c_slm) and meta["cost"]["llm"] == pytest.approx(c_llm)
        assert headers["x-corea-tier"] == "llm" and headers["x-corea-deferred"] == "true"
        assert resp.choices[0].message.content != CONFIDENT_ANSWER


def test_streaming_holds_the_slm_and_streams_the_llm(client):
    def stream(question, tau):
        chunks = list(client.chat.completions.create(
            model="corea-cascade", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24,
            stream=True, stream_options={"include_usage": True}, extra_body={"corea": {"threshold": tau}}))
        deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
        return deltas, final.model_extra["corea"], chunks[-1].usage

    deltas, meta, usage = stream(EASY, 0.5)
    assert deltas == [CONFIDENT_ANSWER] and meta["tier"] == "slm" and meta["confidence"] == 0.9
    assert usage.total_tokens == meta["usage"]["slm"]["prompt_tokens"] + meta["usage"]["slm"]["completion_tokens"]
    deltas, meta, usage = stream(EASY, 1.1)
    assert len(deltas) > 1 and meta["tier"] == "llm" and meta["deferred"] is True  # token by token, live
    plain, _ = ask(client, EASY, 1.1)
    assert "".join(deltas) == plain.choices[0].message.content  # greedy: the same answer either way


def test_forced_tiers_and_the_standalone_slm_app(client, app):
    slm_only, headers = ask(client, HARD, 0.9, model="corea-slm")
    assert slm_only.model_extra["corea"]["tier"] == "slm" and headers["x-corea-deferred"] == "false"
    llm_only, _ = ask(client, EASY, None, model="corea-llm")
    assert llm_only.model_extra["corea"]["tier"] == "llm" and llm_only.model_extra["corea"]["usage"]["slm"] is None
    direct = openai.OpenAI(base_url=f"{app.direct}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in direct.models.list()] == ["corea-slm"]
    resp, _ = ask(direct, EASY, model="corea-slm")
    assert resp.choices[0].message.content == CONFIDENT_ANSWER and resp.model_extra["corea"]["confidence"] == 0.9


def test_metrics_count_what_happened(client, app):
    before = metrics(app.url)
    costs = {"slm": 0.0, "llm": 0.0}
    for question, tau in ((EASY, 0.5), (EASY, 0.5), (HARD, 0.5)):
        resp, _ = ask(client, question, tau)
        for tier in costs:
            costs[tier] += resp.model_extra["corea"]["cost"][tier]
    with pytest.raises(openai.NotFoundError):
        ask(client, EASY, model="no-such-model")
    after = metrics(app.url)
    assert delta(after, before, "corea_requests_total", model="corea-cascade", tier="slm", outcome="ok") == 2
    assert delta(after, before, "corea_requests_total", model="corea-cascade", tier="llm", outcome="ok") == 1
    assert delta(after, before, "corea_requests_total", model="unknown", tier="none", outcome="client_error") == 1
    assert delta(after, before, "corea_cascade_decisions_total", deferred="true") == 1
    assert delta(after, before, "corea_cascade_decisions_total", deferred="false") == 2
    for tier in costs:
        assert delta(after, before, "corea_cost_total", tier=tier) == pytest.approx(costs[tier])
    assert delta(after, before, "corea_tier_latency_seconds_count", tier="llm") == 1
    assert delta(after, before, "corea_slm_confidence_count") == 3
    assert 0 < after[("corea_deferral_rate", ())] < 1


def _body(**fields) -> bytes:
    return json.dumps({"model": "corea-cascade", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


MALFORMED = [
    b"{not json",
    json.dumps({"model": "corea-cascade"}).encode(),
    _body(messages=[{"role": "user", "content": 3}]),
    _body(temperature="hot"),
    _body(model="nope"),
    _body(max_tokens=10**7),
    _body(messages=[{"role": "user", "content": "x" * 80000}]),  # over the 64 KiB body limit: 413
    _body(corea={"threshold": -1}),
    b"",
    _body(n=3),
]


def test_500_requests_one_in_ten_malformed_no_5xx(app):
    async def main():
        results = []
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(500):
            queue.put_nowait(i)
        async with httpx.AsyncClient(base_url=app.url, timeout=120) as http:
            async def worker():
                while not queue.empty():
                    i = queue.get_nowait()
                    if i % 10 == 9:
                        resp = await http.post("/v1/chat/completions", content=MALFORMED[(i // 10) % len(MALFORMED)],
                                               headers={"content-type": "application/json"})
                        results.append(("bad", resp.status_code, resp.text))
                        continue
                    body = {"model": "corea-cascade", "temperature": 0, "max_tokens": 16, "stream": i % 7 == 0,
                            "messages": [{"role": "user", "content": HARD if i % 5 == 0 else EASY}],
                            "corea": {"threshold": 0.5}}
                    resp = await http.post("/v1/chat/completions", json=body)
                    ok = resp.status_code == 200 and (not body["stream"] or resp.text.endswith("data: [DONE]\n\n"))
                    results.append(("good", resp.status_code if ok else -resp.status_code, resp.text[:300]))

            await asyncio.gather(*(worker() for _ in range(16)))
        return results

    start = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - start
    good = [r for r in results if r[0] == "good"]
    bad = [r for r in results if r[0] == "bad"]
    assert len(good) == 450 and len(bad) == 50
    assert all(status == 200 for _, status, _ in good), [r for r in good if r[1] != 200][:3]
    assert all(400 <= status < 500 for _, status, _ in bad), [r for r in bad if not 400 <= r[1] < 500][:3]
    assert all("error" in json.loads(text) for _, _, text in bad)
    print(f"500 requests in {elapsed:.1f} s")


def test_llm_outage_during_traffic_then_recovery(cluster, app):
    """The Serve YAML's application, deployed declaratively; the LLM alone is taken down (its replica needs a
    resource no node has, as when its GPU nodes are gone) and brought back, under traffic."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    entry = yaml.safe_load((ROOT / "configs/serve-tiny-cpu.serve.yaml").read_text())["applications"][0]
    entry.update(name="corea-faults", route_prefix="/faults")
    entry["args"] = {"config": str(ROOT / entry["args"]["config"]), "overrides": {
        "work_dir": str(cluster.work), "limits.llm_timeout_s": 2, "slm.autoscaling.max_replicas": 1,
        "llm.autoscaling.max_replicas": 1, "metrics.ray_export": True}}
    serve_client = _get_global_client()

    def apply(llm_down: bool) -> None:
        actor = {"num_cpus": 0.5, **({"resources": {"corea_no_such_node": 1}} if llm_down else {})}
        entry["deployments"] = [{"name": "LLM", "ray_actor_options": actor}]
        serve_client.deploy_apps(ServeDeploySchema.model_validate({"applications": [entry]}))

    def llm_running() -> int:
        deployments = serve.status().applications["corea-faults"].deployments
        return deployments["LLM"].replica_states.get("RUNNING", 0) if "LLM" in deployments else -1

    apply(llm_down=False)
    wait_running("corea-faults")
    base = app.url  # the cascade app is at route prefix "/"
    url = f"{base}/faults/v1/chat/completions"
    log, marks = [], {}

    async def traffic(stop: asyncio.Event, question: str, tau: float, kind: str):
        async with httpx.AsyncClient(timeout=60) as http:
            while not stop.is_set():
                start = time.time()
                resp = await http.post(url, json={"model": "corea-cascade", "temperature": 0, "max_tokens": 16,
                                                  "messages": [{"role": "user", "content": question}],
                                                  "corea": {"threshold": tau}})
                log.append((kind, start, time.time(), resp.status_code, resp.json()))

    async def scenario():
        stop = asyncio.Event()
        tasks = [asyncio.create_task(traffic(stop, EASY, 0.5, "slm")) for _ in range(2)]
        tasks += [asyncio.create_task(traffic(stop, HARD, 0.5, "deferred")) for _ in range(2)]
        await asyncio.sleep(3)
        marks["apply_down"] = time.time()
        await asyncio.to_thread(apply, True)
        while await asyncio.to_thread(llm_running) != 0:
            await asyncio.sleep(0.2)
        marks["down"] = time.time()
        await asyncio.sleep(6)
        async with httpx.AsyncClient(timeout=30) as http:
            marks["health"] = (await http.get(f"{base}/faults/healthz", params={"tiers": "true"})).json()
        marks["restore"] = time.time()
        await asyncio.to_thread(apply, False)
        deadline = time.time() + 120
        while time.time() < deadline:
            recent = [r for r in log if r[0] == "deferred" and r[1] > marks["restore"]]
            if len(recent) >= 3 and all(r[3] == 200 for r in recent[-3:]):
                break
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)

    try:
        asyncio.run(scenario())
    finally:
        serve.delete("corea-faults")
    assert {r[3] for r in log} <= {200, 503}, {r[3] for r in log}
    assert all(r[3] == 200 for r in log if r[0] == "slm")  # the SLM path never noticed
    deferred = [r for r in log if r[0] == "deferred"]
    assert all(r[3] == 200 and r[4]["corea"]["tier"] == "llm" for r in deferred if r[2] < marks["apply_down"])
    outage = [r for r in deferred if marks["down"] + 0.5 < r[1] and r[2] < marks["restore"]]
    assert outage and all(r[3] == 503 for r in outage)
    assert all(r[4]["error"]["code"] == "tier_unavailable" for r in outage)
    assert marks["health"]["status"] == "degraded" and marks["health"]["tiers"]["slm"] == "ok"
    assert [r[3] for r in deferred[-3:]] == [200, 200, 200]  # recovered without touching the ingress
