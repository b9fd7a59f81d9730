"""The group reward server answering OpenRLHF 0.11.2's own reward client (``SingleTurnAgentExecutor``).

openrlhf is installed without its dependencies (``pip install --no-deps --target``, with ``pylatexenc``, which
``openrlhf.utils`` imports) into a cache folder that only these tests put on ``sys.path``: torch, transformers
and aiohttp come from the project's environment. ``COREA_OPENRLHF_TARGET`` names another folder.
"""

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from corea.integrations.group_reward_server import ServerThread
from corea.integrations.reward_server_config import RewardServerConfig
from corea.protocol import INSTRUCTION
from corea.rewards import group_rewards

OPENRLHF = "openrlhf==0.11.2"
TARGET = Path(os.environ.get("COREA_OPENRLHF_TARGET", Path.home() / ".cache" / "corea-tests" / "openrlhf-0.11.2"))
N = 8


@pytest.fixture(scope="module")
def openrlhf_executor():
    """OpenRLHF's ``SingleTurnAgentExecutor`` class, imported from the real package."""
    if not (TARGET / "openrlhf" / "utils" / "agent.py").is_file():
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TARGET),
                               OPENRLHF, "pylatexenc==2.11"], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"could not install {OPENRLHF} into {TARGET}:\n{done.stderr[-2000:]}")
        shutil.rmtree(TARGET / "tests", ignore_errors=True)  # the wheel ships a top-level ``tests`` package
    sys.path.insert(0, str(TARGET))  # the folder holds openrlhf and pylatexenc only
    try:
        from openrlhf.utils.agent import SingleTurnAgentExecutor

        assert Path(sys.modules["openrlhf"].__file__).is_relative_to(TARGET)
        yield SingleTurnAgentExecutor
    finally:
        sys.path.remove(str(TARGET))


def _server(**cfg):
    return ServerThread(RewardServerConfig(host="127.0.0.1", port=0, **cfg)).start()


def _prompt(i: int) -> str:
    return f"<|im_start|>user\nQuestion {i}: what is {i} + {i}? {INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"


PATHOLOGICAL = ["\\boxed{9^{9^{9^{9^{9}}}}} \\confidence{0.5}", "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
                "x" * 200_000 + " \\boxed{(x+1)^{100000}} \\confidence{0.9}", "\\boxed{100000000!} \\confidence{1e400}"]


def _response(i: int, j: int) -> str:
    """Sample j of prompt i: correct for j < i % 9, with varied confidences, forms and faults."""
    gold = 2 * i
    answer = gold if j < i % (N + 1) else gold + 1
    if i % 16 == 5 and j == 3:
        return PATHOLOGICAL[(i // 16) % len(PATHOLOGICAL)]
    form = (j + i) % 4
    if form == 0:
        # a sum left unsimplified: graded by math-verify in the worker pool
        return f"so \\boxed{{{i} + {answer - i}}} \\confidence{{{(j + 1) / 10}}}<|im_end|>"
    if form == 1:
        return f"\\boxed{{\\frac{{{2 * answer}}}{{2}}}}<|im_end|>"  # no confidence; a fraction to simplify
    if form == 2:
        return f"答案 \\boxed{{{answer}}} \\confidence{{0.{j}5}}<|im_end|>"  # switches script: format 0
    return f"\\boxed{{{answer}.0}} \\confidence{{{1 - j / 10}}}<|im_end|>"


def _expected(prompt, label, responses):
    return group_rewards(responses, label, "math", "l1", prompt=prompt)


def _check(answer, breakdown):
    assert answer["rewards"] == [pytest.approx(breakdown.total)]
    assert answer["scores"] == [breakdown.correctness]
    logs = answer["extra_logs"]
    assert logs["correctness"] == [breakdown.correctness] and logs["format"] == [pytest.approx(breakdown.format)]
    assert logs["confidence_reward"] == [pytest.approx(breakdown.confidence_reward)]
    assert logs["group_accuracy"] == [pytest.approx(breakdown.group_accuracy)]


def _metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_64_prompts_x_8_concurrent_samples_and_a_duplicate_prompt(openrlhf_executor):
    """512 requests in flight at once, as 64 x ``generate_responses`` would send them, plus prompt 0 twice."""
    server = _server(n_samples_per_prompt=N, group_wait_s=60)
    base = server.url.rsplit("/", 1)[0]
    try:
        executor = openrlhf_executor(server.url)
        jobs = [(i, j, _prompt(i), str(2 * i), _response(i, j)) for i in range(64) for j in range(N)]
        # prompt 0 a second time in the same batch: 8 more samples, all correct
        dup = [(0, N + j, _prompt(0), "0", f"\\boxed{{0}} \\confidence{{0.{j}}}") for j in range(N)]
        jobs = jobs + dup
        order = sorted(range(len(jobs)), key=lambda k: (k * 7919) % len(jobs))  # samples interleaved

        async def run():
            async def one(k):
                i, j, prompt, label, response = jobs[k]
                out = await executor._fetch_rewards_via_http([prompt + response], [prompt], [label])
                return k, out[0]

            start = time.monotonic()
            answers = dict(await asyncio.gather(*(one(k) for k in order)))
            return answers, time.monotonic() - start

        answers, elapsed = asyncio.run(run())
        print(f"{len(jobs)} requests answered in {elapsed:.1f} s (load {os.getloadavg()[0]:.1f})")
        assert len(answers) == len(jobs) and elapsed < 60  # every group complete: nothing waited for a timeout
        for i in range(1, 64):
            ks = [k for k, job in enumerate(jobs) if job[0] == i]
            for k, breakdown in zip(ks, _expected(_prompt(i), str(2 * i), [jobs[k][4] for k in ks])):
                _check(answers[k], breakdown)
        # prompt 0: 16 requests split into two groups of 8 in arrival order. A reward depends on the text and its
        # group's p only, so the two groups are told apart by the p they report (one p: any split gives it)
        ks = [k for k, job in enumerate(jobs) if job[0] == 0]
        by_p = {}
        for k in ks:
            by_p.setdefault(answers[k]["extra_logs"]["group_accuracy"][0], []).append(k)
        assert sorted(map(len, by_p.values())) in ([N, N], [2 * N])
        for members in by_p.values():
            for k, breakdown in zip(members, _expected(_prompt(0), "0", [jobs[k][4] for k in members])):
                _check(answers[k], breakdown)
        assert _metric(base, "corea_reward_groups_completed_total") == 65
        assert _metric(base, "corea_reward_groups_timed_out_total") == 0
        assert _metric(base, "corea_reward_open_groups") == 0
    finally:
        server.stop()


def test_missing_sample_straggler_retry_and_backpressure(openrlhf_executor):
    wait = 1.5
    server = _server(n_samples_per_prompt=4, group_wait_s=wait, max_open_groups=1)
    base = server.url.rsplit("/", 1)[0]
    try:
        executor = openrlhf_executor(server.url)
        prompt, label = _prompt(3), "6"
        responses = [f"\\boxed{{{6 if j % 2 else 7}}} \\confidence{{0.{j + 2}}}" for j in range(4)]

        async def fetch(response, p=prompt, gold=label):
            start = time.monotonic()
            out = await executor._fetch_rewards_via_http([p + response], [p], [gold])
            return out[0], time.monotonic() - start

        async def run():
            # three of four samples arrive; the fourth is lost. Meanwhile another prompt finds the one open-group
            # slot taken (503) and OpenRLHF's client retries it 1 s later
            short = [asyncio.create_task(fetch(r)) for r in responses[:3]]
            await asyncio.sleep(0.2)
            other = asyncio.create_task(fetch("\\boxed{2} \\confidence{0.9}", _prompt(1), "2"))
            got = [await t for t in short]
            late, late_s = await fetch(responses[3])  # the lost sample turns up after the timeout
            retry, retry_s = await fetch(responses[1])  # the same query again: the answer already computed
            return got, (late, late_s), (retry, retry_s), await other

        got, (late, late_s), (retry, retry_s), (other, other_s) = asyncio.run(run())
        for (answer, seconds), breakdown in zip(got, _expected(prompt, label, responses[:3])):
            assert wait <= seconds < wait + 10
            _check(answer, breakdown)
        _check(late, _expected(prompt, label, responses)[3])  # scored with its group: p over all four
        assert late_s < 5 and retry_s < 5
        assert retry == got[1][0]
        _check(other, _expected(_prompt(1), "2", ["\\boxed{2} \\confidence{0.9}"])[0])
        assert other_s >= 1.0  # refused once, answered on OpenRLHF's retry
        assert _metric(base, "corea_reward_groups_timed_out_total") == 2
        assert _metric(base, 'corea_reward_requests_total{outcome="overloaded"}') >= 1
        assert _metric(base, "corea_reward_stragglers_total") == 1
        assert _metric(base, "corea_reward_retries_total") == 1
        assert _metric(base, "corea_reward_group_wait_mean_seconds") >= wait
    finally:
        server.stop()


def test_bad_requests_get_4xx_with_a_message():
    server = _server(n_samples_per_prompt=2, group_wait_s=5, max_request_bytes=4096)
    base = server.url.rsplit("/", 1)[0]
    try:
        with httpx.Client(timeout=10) as client:
            assert client.get(base + "/healthz").json()["status"] == "ok"
            cases = [
                (b"{not json", 400, "not JSON"),
                (b'{"query": ["q"], "prompts": ["p"]}', 422, "labels"),
                (b'{"query": ["q"], "prompts": ["p"], "labels": [null]}', 422, "label_key"),
                (b'{"query": ["q"], "prompts": ["p"], "labels": [""]}', 422, "label_key"),
                (b'{"query": [], "prompts": [], "labels": []}', 422, "empty"),
                (b'{"query": ["a", "b"], "prompts": ["p"], "labels": ["1"]}', 422, "2 queries"),
                (b'{"query": [1], "prompts": ["p"], "labels": ["1"]}', 422, "query"),
                (b'{"query": ["' + b"x" * 5000 + b'"], "prompts": ["p"], "labels": ["1"]}', 413, "exceeds"),
            ]
            for body, status, words in cases:
                r = client.post(server.url, content=body, headers={"content-type": "application/json"})
                assert r.status_code == status and words in r.json()["error"], (body[:60], r.text)
            assert client.get(base + "/healthz").json()["open_groups"] == 0  # nothing joined a group
            # one request carrying a whole group (several samples) is answered in order
            r = client.post(server.url, json={"query": ["p\\boxed{1} \\confidence{1}", "p\\boxed{2}"],
                                              "prompts": ["p", "p"], "labels": [1, 1]})
            assert r.status_code == 200 and r.json()["extra_logs"]["group_accuracy"] == [0.5, 0.5]
            assert r.json()["rewards"] == pytest.approx([b.total for b in _expected(
                "p", "1", ["\\boxed{1} \\confidence{1}", "\\boxed{2}"])])
    finally:
        server.stop()


def test_cli_defaults_config_file_and_a_real_process(tmp_path):
    from corea.cli import build_parser
    from corea.integrations.reward_server_config import load_reward_server_config

    args = build_parser().parse_args(["reward-server", "--port", "5000", "--n-samples-per-prompt", "8"])
    assert args.command == "reward-server" and args.port == 5000 and args.n_samples_per_prompt == 8
    defaults = load_reward_server_config()
    assert (defaults.confidence_reward, defaults.grading, defaults.n_samples_per_prompt) == ("l1", "math", 8)
    assert defaults.group_wait_s < 180 and defaults.route == "/get_reward"

    bad = tmp_path / "bad.yaml"
    bad.write_text("confidence_reward: l3\ngroup_wait_s: 200\n")
    done = subprocess.run([sys.executable, "-m", "corea.cli", "reward-server", "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "confidence_reward" in done.stderr and "group_wait_s" in done.stderr

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    good = tmp_path / "brier.yaml"
    good.write_text("confidence_reward: brier\ngrading: auto\n")
    proc = subprocess.Popen([sys.executable, "-m", "corea.cli", "reward-server", "--config", str(good),
                             "--host", "127.0.0.1", "--port", str(port), "--n-samples-per-prompt", "2"])
    try:
        base = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).json()["n_samples_per_prompt"] == 2:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < end, "the server did not come up"
            time.sleep(0.3)
        responses = ["\\boxed{B} \\confidence{0.7}", "The answer is C. \\confidence{0.4}"]

        async def both():
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client.post(base + "/get_reward", json={
                    "query": ["Q2: " + r], "prompts": ["Q2: "], "labels": ["B"]}) for r in responses))

        # two samples of one prompt on two connections: the first is held until the second arrives
        answers = [r.json() for r in asyncio.run(both())]
        expected = group_rewards(responses, "B", "choice", "brier", prompt="Q2: ")
        for answer, breakdown in zip(answers, expected):
            _check(answer, breakdown)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_ray_serve_deployment_answers_openrlhf(openrlhf_executor):
    """The same app as a one-replica Serve deployment on a local cluster, called by OpenRLHF's client."""
    import socket

    ray = pytest.importorskip("ray")
    from ray import serve

    from corea.integrations.group_reward_serve import build_reward_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_reward_app({"n_samples_per_prompt": N, "group_wait_s": 30}), name="corea-reward",
                  route_prefix="/")
        executor = openrlhf_executor(f"http://127.0.0.1:{port}/get_reward")
        jobs = [(i, _prompt(i), str(2 * i), _response(i, j)) for i in (1, 4, 7) for j in range(N)]

        async def run():
            return await asyncio.gather(*(executor._fetch_rewards_via_http([p + r], [p], [gold])
                                          for _, p, gold, r in jobs))

        start = time.monotonic()
        answers = [out[0] for out in asyncio.run(run())]
        assert time.monotonic() - start < 30  # whole groups: none waited for the timeout
        for i in (1, 4, 7):
            ks = [k for k, job in enumerate(jobs) if job[0] == i]
            for k, breakdown in zip(ks, _expected(_prompt(i), str(2 * i), [jobs[k][3] for k in ks])):
                _check(answers[k], breakdown)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["open_groups"] == 0
    finally:
        serve.shutdown()
        ray.shutdown()
