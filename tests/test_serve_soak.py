"""The cascade as `corea serve` starts it (keys hashed and dropped from the environment, the proxy middleware set
before Ray starts), under hostile clients and replica deaths, on loopback with tiny checkpoints.

Each test is bounded in time and request count; the soak-and-chaos test kills one replica of each kind in
turn (SLM, LLM, ingress, proxy) under mixed valid, malformed and hostile traffic and prints its figures.
"""

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corea.serve.tiny import CONFIDENT_QUESTIONS, UNSURE_QUESTIONS, confident_slm_path, make_confident_slm

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from support import ROOT, free_port, wait_running  # noqa: E402

EASY, HARD = CONFIDENT_QUESTIONS[0], UNSURE_QUESTIONS[0]
KEY = "soak-key-3f9c1e7d2b5a"
KEY_ENV = "COREA_SOAK_TEST_KEYS"
BOUND_S = 30.0  # no request may take longer (client timeout)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from corea.serve.app import deploy, prepare
    from corea.serve.cli import _connect
    from corea.serve.config import load_serve_config

    work = tmp_path_factory.mktemp("soak")
    make_confident_slm(confident_slm_path(work))
    if ray.is_initialized():
        ray.shutdown()
    saved = dict(os.environ)
    os.environ.pop("RAY_ADDRESS", None)
    os.environ[KEY_ENV] = KEY
    port = free_port()
    name = f"soak{port}"
    cfg = load_serve_config(ROOT / "configs/serve-tiny-cpu.yaml", {
        "name": name, "work_dir": str(work), "http.port": port, "auth.api_keys_env": KEY_ENV,
        "slm.autoscaling.max_replicas": 1, "llm.autoscaling.max_replicas": 1, "limits.default_max_tokens": 16,
        "limits.max_prompt_tokens": 512, "limits.body_min_rate_bps": 1, "limits.body_timeout_s": 8,
        "limits.slm_timeout_s": 20, "limits.llm_timeout_s": 20, "ingress.health_check_period_s": 2,
        "slm.health_check_period_s": 2, "llm.health_check_period_s": 2})
    try:
        cfg = prepare(cfg)  # what `corea serve` does first
        assert KEY_ENV not in os.environ
        _connect(cfg)  # a local cluster, the proxy middleware in its environment
        deploy(cfg)
        wait_running(name)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, name=name, cfg=cfg)
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


AUTH = {"authorization": f"Bearer {KEY}"}


def body(question=EASY, tau=0.5, model="corea-cascade", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": 16, "corea": {"threshold": tau}, **extra}


def actor_pids(app: str) -> dict[str, int]:
    """Serve's actors of this cluster by kind (replicas of ``app``, proxy, controller) -> process id."""
    out = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name, namespace = entry["name"], entry["namespace"]
        kind = next((k for k in ("SLM", "LLM", "CascadeIngress") if f"{app}#{k}#" in name), None)
        if kind is None and name.startswith("SERVE_PROXY_ACTOR"):
            kind = "proxy"
        if kind is None and name == "SERVE_CONTROLLER_ACTOR":
            kind = "controller"
        if kind is not None:
            handle = ray.get_actor(name, namespace=namespace)
            out[kind] = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    return out


def test_api_keys_never_reach_a_replica_environment(served):
    pids = actor_pids(served.name)
    assert {"SLM", "LLM", "CascadeIngress", "proxy", "controller"} <= set(pids), pids
    for kind, pid in pids.items():
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert KEY.encode() not in environ and f"{KEY_ENV}=".encode() not in environ, kind
    assert b"corea.serve.proxy_guard:middlewares" in Path(f"/proc/{pids['proxy']}/environ").read_bytes()
    ok = httpx.post(f"{served.url}/v1/chat/completions", json=body(), headers=AUTH, timeout=60)
    assert ok.status_code == 200, ok.text  # the digest still admits the key
    assert httpx.post(f"{served.url}/v1/chat/completions", json=body(), timeout=60).status_code == 401


async def _read_response(reader, timeout: float) -> bytes:
    """One HTTP/1.1 response (headers and a Content-Length body) from a raw connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await asyncio.wait_for(reader.readexactly(length), timeout)


async def _slow_client(port: int, hold_s: float) -> tuple[float, int | None, bytes]:
    """Headers declaring a 500,000-byte body, 40 body bytes, then silence; what came back and when."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 500000\r\n\r\n" + b"{" * 40)
    await writer.drain()
    try:
        raw = await _read_response(reader, hold_s)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError):
        raw = b""
    writer.close()
    status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1") else None
    return time.perf_counter() - start, status, raw.partition(b"\r\n\r\n")[2]


def test_slow_bodies_do_not_hold_the_ingress(served):
    """300 connections that send 40 of 500,000 body bytes, while easy requests keep their usual latency; the slow
    ones get a 408 JSON at the body deadline (8 s here; the minimum rate is set to 1 B/s so that they live)."""

    async def main():
        async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=BOUND_S) as http:
            async def timed():
                start = time.perf_counter()
                resp = await http.post("/v1/chat/completions", json=body())
                return resp.status_code, time.perf_counter() - start

            usual = [await timed() for _ in range(5)]
            slow = [asyncio.create_task(_slow_client(served.port, 20)) for _ in range(300)]
            await asyncio.sleep(1.0)  # all 300 connected and stalled
            during = []
            for _ in range(8):
                during.append(await timed())
                health = await http.get("/healthz")
                assert health.status_code == 200
            return usual, during, await asyncio.gather(*slow)

    usual, during, slow = asyncio.run(main())
    assert all(s == 200 for s, _ in usual + during), (usual, during)
    typical = sorted(t for _, t in usual)[len(usual) // 2]
    worst_during = max(t for _, t in during)
    print(f"easy request median {typical:.3f} s before, worst {worst_during:.3f} s with 300 stalled bodies")
    assert worst_during < 3 * typical + 1.0, (usual, during)
    assert all(status == 408 for _, status, _ in slow), {status for _, status, _ in slow}
    assert all(json.loads(text)["error"]["code"] == "request_timeout" for _, _, text in slow)
    assert max(t for t, _, _ in slow) < 8 + 5


def test_websocket_upgrade_without_key_is_answered(served):
    """Upstream, the Serve proxy hands a POST with ``Upgrade: websocket`` to uvicorn's WebSocket protocol, whose
    parser fails without answering (uvicorn 0.54, websockets 17); the proxy callback turns that protocol off, so
    the request is plain HTTP and gets an answer at once."""

    async def main():
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        payload = json.dumps(body()).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(payload)).encode() +
                     b"\r\n\r\n" + payload)
        await writer.drain()
        start = time.perf_counter()
        raw = await _read_response(reader, 20)
        writer.close()
        return raw, time.perf_counter() - start

    raw, elapsed = asyncio.run(main())
    status = int(raw.split(b" ", 2)[1])
    # h11 holds back the body of a request proposing a protocol switch: the ingress sees none (400 JSON)
    assert 400 <= status < 500 and b"application/json" in raw.partition(b"\r\n\r\n")[0].lower(), raw[:300]
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["message"]
    assert elapsed < 5
    print(f"POST with Upgrade: websocket and no key: {status} after {elapsed:.2f} s")


def test_long_prompts_are_refused_without_starving_easy_ones(served):
    """10 concurrent 32,000-character prompts (over limits.max_prompt_tokens: 512 here) with easy requests
    beside them: the long ones get 400 from the tier's token count, before any generation; the easy ones 200."""

    async def main():
        async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=BOUND_S) as http:
            async def timed(question):
                start = time.perf_counter()
                resp = await http.post("/v1/chat/completions", json=body(question))
                return resp, time.perf_counter() - start

            usual = [(await timed(EASY))[1] for _ in range(3)]
            long = [asyncio.create_task(timed("word " * 6400)) for _ in range(10)]
            easy = [asyncio.create_task(timed(EASY)) for _ in range(5)]
            return usual, await asyncio.gather(*long), await asyncio.gather(*easy)

    usual, long, easy = asyncio.run(main())
    for resp, _ in long:
        assert resp.status_code == 400 and "at most 512 are allowed" in resp.json()["error"]["message"], resp.text
    assert all(resp.status_code == 200 for resp, _ in easy)
    print(f"10 long prompts refused in at most {max(t for _, t in long):.2f} s; easy requests beside them at most "
          f"{max(t for _, t in easy):.2f} s (alone: median {sorted(usual)[1]:.2f} s)")
    assert max(t for _, t in easy) < 3 * sorted(usual)[1] + 2.0


def test_dead_ingress_in_flight_requests_get_503_json(served):
    ingress = actor_pids(served.name)["CascadeIngress"]  # looked up first: the lookup takes a while

    async def main():
        async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=BOUND_S) as http:
            inflight = [asyncio.create_task(http.post("/v1/chat/completions", json=body(
                HARD, model="corea-llm", max_tokens=512, min_tokens=512))) for _ in range(6)]
            await asyncio.sleep(0.3)  # the LLM is decoding them: 512 tokens whatever the tiny model's EOS
            assert not any(task.done() for task in inflight), "the requests finished before the kill"
            os.kill(ingress, signal.SIGKILL)
            killed = time.perf_counter()
            results = await asyncio.gather(*inflight)
            recovered = None
            while time.perf_counter() - killed < 120:
                resp = await http.post("/v1/chat/completions", json=body())
                assert resp.status_code in (200, 503), resp.text
                assert resp.headers["content-type"].startswith("application/json")
                if resp.status_code == 200:
                    recovered = time.perf_counter() - killed
                    break
                await asyncio.sleep(0.5)
            return results, recovered

    results, recovered = asyncio.run(main())
    statuses = [r.status_code for r in results]
    assert 503 in statuses and set(statuses) <= {200, 503}, statuses
    for r in results:
        assert r.headers["content-type"].startswith("application/json")
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "replica_unavailable" and r.headers["retry-after"]
    assert recovered is not None
    print(f"ingress killed with {statuses.count(503)} requests in flight; 200 again after {recovered:.1f} s")


def _requests_total(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=BOUND_S).text):
        for s in family.samples:
            if s.name == "corea_requests_total":
                out[s.labels["outcome"]] = out.get(s.labels["outcome"], 0.0) + s.value
    return out


def _traffic_mix() -> list[tuple[str, dict]]:
    """(kind, httpx request arguments); kind "ok" must be 200 (or 503 while a replica is down)."""
    js = {"content-type": "application/json", **AUTH}
    return [
        ("ok", {"json": body(EASY)}),
        ("ok", {"json": body(HARD)}),  # deferred to the LLM
        ("stream", {"json": body(EASY, stream=True)}),
        ("ok", {"json": body(EASY, stream=None, n=None)}),
        ("bad", {"content": b"[" * 969, "headers": js}),
        ("bad", {"content": json.dumps(body("\ud800")).encode(), "headers": js}),
        ("bad", {"content": json.dumps(body()).encode(), "headers": {**AUTH, "content-type": "text/plain"}}),
        ("bad", {"json": body(logprobs=True)}),
        ("bad", {"json": body(tool_choice="required")}),
        ("bad", {"json": body("word " * 700)}),  # over limits.max_prompt_tokens = 512
        ("bad", {"json": body(max_tokens=10**6)}),
        ("bad", {"content": b"{not json", "headers": js}),
        ("bad", {"json": body(model="gpt-9")}),
        ("bad", {"json": body(), "headers": {"authorization": "Bearer wrong"}}),
    ]


def test_soak_and_chaos_one_replica_of_each_kind_killed_in_turn(served):
    """Mixed traffic from 4 clients (and 10 stalled bodies at a time) while the SLM, LLM, ingress and proxy replicas are
    killed in turn (SIGKILL; the proxy through ray.kill); each kill waits for recovery (3 deferred requests
    answered in a row) before the next. Then a quiet phase checks that /metrics counted every response."""
    mix = _traffic_mix()
    log: list[tuple] = []  # (phase, kind, start, end, status or exception name, content type, error code)
    phase = {"name": "warmup"}
    timeline: dict[str, float] = {}

    async def one(http, kind, args):
        start = time.perf_counter()
        try:
            resp = await http.post("/v1/chat/completions", **args)
            code = None
            if resp.headers.get("content-type", "").startswith("application/json") and resp.status_code >= 400:
                code = resp.json()["error"].get("code")
            entry = (resp.status_code, resp.headers.get("content-type", ""), code, resp.text)
        except httpx.TimeoutException:
            entry = ("timeout", "", None, "")
        except httpx.TransportError as exc:
            entry = (type(exc).__name__, "", None, "")
            await asyncio.sleep(0.5)  # no connection: back off as a client would
        log.append((phase["name"], kind, start, time.perf_counter(), *entry))
        return entry[0]

    async def client(i, stop):
        async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=BOUND_S) as http:
            n = i
            while not stop.is_set():
                kind, args = mix[n % len(mix)]
                n += 1
                await one(http, kind, args)

    async def stalled(stop):
        while not stop.is_set():
            results = await asyncio.gather(*(_slow_client(served.port, 20) for _ in range(10)),
                                           return_exceptions=True)
            log.extend((phase["name"], "slow", 0, r[0], r[1] or "closed", "", None, "") for r in results
                       if not isinstance(r, BaseException))
            if any(isinstance(r, BaseException) for r in results):
                await asyncio.sleep(0.5)

    async def recovered(since: float, limit: float = 120.0) -> float:
        async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=BOUND_S) as http:
            streak = 0
            while time.perf_counter() - since < limit:
                streak = streak + 1 if await one(http, "probe", {"json": body(HARD)}) == 200 else 0
                if streak == 3:
                    return time.perf_counter() - since
                await asyncio.sleep(0.3)
        raise AssertionError(f"no recovery within {limit} s in phase {phase['name']}")

    def kill(kind: str) -> None:
        if kind == "proxy":
            proxy = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["name"].startswith("SERVE_PROXY_ACTOR"))
            ray.kill(ray.get_actor(proxy, namespace="serve"))
        else:
            os.kill(actor_pids(served.name)[kind], signal.SIGKILL)

    async def scenario():
        stop = asyncio.Event()
        tasks = [asyncio.create_task(client(i, stop)) for i in range(4)] + [asyncio.create_task(stalled(stop))]
        await asyncio.sleep(4)
        for kind in ("SLM", "LLM", "CascadeIngress", "proxy"):
            phase["name"] = kind
            await asyncio.to_thread(kill, kind)
            killed = time.perf_counter()
            timeline[kind] = await recovered(killed)
            await asyncio.sleep(2)
        phase["name"] = "after"
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*tasks)

    start = time.perf_counter()
    asyncio.run(scenario())
    elapsed = time.perf_counter() - start

    # the quiet phase: every response of the ingress is counted once, by outcome
    before = _requests_total(served.url)
    sent = {"ok": 0, "client_error": 0}
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=BOUND_S) as http:
        for kind, args in mix * 2:
            resp = http.post("/v1/chat/completions", **args)
            good = kind in ("ok", "stream")
            assert resp.status_code == 200 if good else 400 <= resp.status_code < 500, (kind, resp.text[:200])
            sent["ok" if good else "client_error"] += 1
    after = _requests_total(served.url)
    counted = {k: after.get(k, 0) - before.get(k, 0) for k in sent}

    statuses: dict = {}
    for entry in log:
        statuses[entry[4]] = statuses.get(entry[4], 0) + 1
    latencies = sorted(e[3] - e[2] for e in log if e[1] != "slow")
    print(f"soak: {len(log)} requests in {elapsed:.0f} s; statuses {statuses}; recovery after kill (s) "
          f"{ {k: round(v, 1) for k, v in timeline.items()} }; latency p50 {latencies[len(latencies) // 2]:.2f} s, "
          f"max {latencies[-1]:.2f} s; quiet phase sent {sent}, counted {counted}")
    for ph, kind, _, _, status, ctype, code, text in log:
        assert status != "timeout", (ph, kind)
        if isinstance(status, str):  # no connection while the proxy is replaced; a stream cut by its ingress
            assert ph == "proxy" or (ph == "CascadeIngress" and kind == "stream"), (ph, kind, status)
            continue
        if status >= 500:
            assert status == 503 and ctype.startswith("application/json"), (ph, kind, status, text[:200])
            assert code in ("tier_unavailable", "tier_overloaded", "replica_unavailable", "proxy_starting",
                            "service_unavailable"), (ph, kind, code)
        elif kind in ("ok", "stream", "probe"):
            assert status == 200, (ph, kind, status, text[:200])
        elif kind == "slow":
            assert status == 408, (ph, status)
        else:
            assert 400 <= status < 500 and ctype.startswith("application/json"), (ph, kind, status, text[:200])
    assert counted == sent
