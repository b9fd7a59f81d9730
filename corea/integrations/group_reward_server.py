"""COREA's group-level RLCC reward for OpenRLHF: an HTTP reward server that holds each prompt's group.

The protocol, as openrlhf 0.11.2 speaks it (read in its wheel):

- ``openrlhf/utils/agent.py``, ``SingleTurnAgentExecutor.execute``: after generating ONE sample it decodes
  ``prompt tokens + response tokens`` (``skip_special_tokens=False``) into ``query`` and calls
  ``_fetch_rewards_via_http([query], [prompt], [label])``; from the first JSON answer it reads ``rewards``
  (stored as the sample's reward), ``scores`` (falling back to ``rewards``; OpenRLHF's dynamic filtering
  averages them over a group) and ``extra_logs`` (a dict, each value logged per sample).
- ``SingleTurnAgentExecutor._fetch_rewards_via_http``: ``POST`` to each URL of ``--reward.remote_url``
  (comma-separated, one URL per call in rotation) the JSON ``{"query": [...], "prompts": [...], "labels": [...]}``
  with ``aiohttp.ClientTimeout(total=180)``; any error, non-2xx status included (``raise_for_status``), is
  retried after 1 s, 5 tries in all, then the sample keeps no reward (the error is only logged).
- ``openrlhf/trainer/ray/vllm_engine.py``, ``generate_responses``: the ``n_samples_per_prompt`` samples of one
  prompt are ``asyncio.gather``-ed on one engine, so their requests arrive close together, each on its own
  connection; ``openrlhf/cli/serve_rm.py`` (OpenRLHF's own reward server) answers lists aligned with
  ``query``: ``{"rewards": [...], "scores": [...], "extra_logs": {name: [...]}}``; so does this one.
- ``openrlhf/trainer/ppo_utils/experience_maker.py``, ``compute_advantages_and_returns``: with
  ``--algo.advantage.estimator group_norm`` the advantage is (r - mean_group) / (std_group + 1e-9) over the
  n samples of a prompt (flags: ``--reward.remote_url``, ``--rollout.n_samples_per_prompt``,
  ``--data.label_key``; ``openrlhf/cli/train_ppo_ray.py``).

What this server does with it: requests are grouped by (prompt, label) (``corea.integrations.grouping``), a
group of n is graded in the worker pool (``corea.rewards.batch_group_rewards``, off the event loop) and every
member is answered with r = w_acc y + w_fmt r_fmt + w_conf r_conf, r_conf the configured confidence reward
(L1: -|c - p|, p the group accuracy). ``rewards`` = r, ``scores`` = y (so OpenRLHF's dynamic filtering keeps
groups whose accuracy is strictly between 0 and 1), ``extra_logs``: ``correctness``, ``format``,
``confidence_reward``, ``group_accuracy``. A group still short after ``group_wait_s`` (default 60 s, well under
the client's 180 s) is scored with what arrived and logged. ``GET /healthz``, ``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from corea import grading
from corea.integrations.grouping import Admission, BookFull, Group, GroupBook, split_response
from corea.integrations.reward_server_config import RewardServerConfig
from corea.rewards import RewardBreakdown, batch_group_rewards
from corea.serve.ingress import read_body
from corea.serve.openai_schema import ApiError

log = logging.getLogger(__name__)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 90, 120, 180)
_CHOICE = re.compile(r"^\s*\(?[A-J]\)?\s*$")  # "auto" grading: such a label is a choice letter


class RewardRequest(BaseModel):
    """OpenRLHF's payload: three aligned lists (one element per sample; 0.11.2 sends one)."""

    model_config = ConfigDict(extra="ignore")
    query: list[str]
    prompts: list[str]
    labels: list[str | int | float]

    @field_validator("labels", mode="before")
    @classmethod
    def _no_null(cls, labels: Any) -> Any:
        if isinstance(labels, list) and any(label is None or label == "" for label in labels):
            raise ValueError("a label is null or empty: start OpenRLHF with --data.label_key naming the gold answer")
        return labels

    @model_validator(mode="after")
    def _aligned(self) -> "RewardRequest":
        if not self.query:
            raise ValueError("query is empty")
        if not (len(self.query) == len(self.prompts) == len(self.labels)):
            raise ValueError(f"{len(self.query)} queries, {len(self.prompts)} prompts, {len(self.labels)} labels")
        return self


@dataclass
class _Job:
    """Responses graded together; ``resolve[i]`` gets the answer of ``queries[i]`` (None: already answered)."""

    group: Group
    queries: list[str]
    resolve: list[asyncio.Future | None]


class _Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("corea_reward_requests", "reward requests by outcome", ("outcome",), registry=r)
        self.completed = Counter("corea_reward_groups_completed", "groups graded with all n members", registry=r)
        self.timed_out = Counter("corea_reward_groups_timed_out", "groups graded short after the wait", registry=r)
        self.stragglers = Counter("corea_reward_stragglers", "late members scored with their timed-out group",
                                  registry=r)
        self.retries = Counter("corea_reward_retries", "requests answered from the answers already computed",
                               registry=r)
        self.wait = Histogram("corea_reward_group_wait_seconds", "first arrival to grading, per group",
                              buckets=WAIT_BUCKETS, registry=r)
        self.mean_wait = Gauge("corea_reward_group_wait_mean_seconds", "mean of corea_reward_group_wait_seconds",
                               registry=r)
        self.open_groups = Gauge("corea_reward_open_groups", "groups waiting for members", registry=r)
        self.cached = Gauge("corea_reward_cached_answers", "answers kept for retries", registry=r)
        self._wait_sum, self._wait_n = 0.0, 0

    def observe_wait(self, seconds: float) -> None:
        self.wait.observe(seconds)
        self._wait_sum, self._wait_n = self._wait_sum + seconds, self._wait_n + 1
        self.mean_wait.set(self._wait_sum / self._wait_n)


def answer_fields(scored: list[RewardBreakdown]) -> dict[str, Any]:
    """The JSON answer for scored samples, in OpenRLHF's shape (lists aligned with ``query``)."""
    return {
        "rewards": [s.total for s in scored],
        "scores": [s.correctness for s in scored],
        "extra_logs": {
            "correctness": [s.correctness for s in scored],
            "format": [s.format for s in scored],
            "confidence_reward": [s.confidence_reward for s in scored],
            "group_accuracy": [s.group_accuracy for s in scored],
        },
    }


class GroupRewardService:
    """The grouping, grading and answering behind the HTTP app; lives on one event loop (one process)."""

    def __init__(self, cfg: RewardServerConfig):
        self.cfg = cfg
        self.book = GroupBook(cfg.n_samples_per_prompt, cfg.group_wait_s, cfg.max_open_groups, cfg.cache_size,
                              cfg.cache_ttl_s)
        self.metrics = _Metrics()
        self._futures: dict[int, list[asyncio.Future]] = {}  # open or grading group id -> one future per slot
        self._jobs: asyncio.Queue[_Job] | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        if cfg.grader_processes:
            grading.configure(processes=cfg.grader_processes)

    def kind_of(self, label: str) -> str:
        if self.cfg.grading == "auto":
            return "choice" if _CHOICE.match(label) else "math"
        return self.cfg.grading

    # ------------------------------------------------------------------------------------------ requests
    async def score(self, req: RewardRequest) -> dict[str, Any]:
        self._start()
        now = time.monotonic()
        waits: list[asyncio.Future] = []
        for query, prompt, label in zip(req.query, req.prompts, req.labels):
            waits.append(self._admit(self.book.admit(prompt, str(label), query, now)))
        self._wake.set()  # a new open group may have the earliest deadline
        self._gauges()
        return answer_fields(list(await asyncio.gather(*waits)))

    def _admit(self, adm: Admission) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if adm.kind == "answered":
            self.metrics.retries.inc()
            fut = loop.create_future()
            fut.set_result(adm.answer)
            return fut
        if adm.kind == "grading":
            self.metrics.retries.inc()
            return asyncio.shield(self._futures[adm.group.id][adm.slot])
        if adm.kind == "straggler":
            self.metrics.stragglers.inc()
            fut = loop.create_future()
            s = adm.straggler
            log.debug("late member of a timed-out group (prompt ...%r) scored with its %d earlier members",
                     s.group.prompt[-60:], len(s.group.queries))
            self._jobs.put_nowait(_Job(s.group, s.group.queries + [s.query], [None] * len(s.group.queries) + [fut]))
            s.group.queries.append(s.query)  # the next straggler counts this one too
            return fut
        futures = self._futures.setdefault(adm.group.id, [])
        futures.append(loop.create_future())
        if adm.closed:
            self._submit(adm.group)
        return asyncio.shield(futures[adm.slot])

    def _submit(self, group: Group) -> None:
        (self.metrics.timed_out if group.timed_out else self.metrics.completed).inc()
        self.metrics.observe_wait(time.monotonic() - group.opened_at)
        self._jobs.put_nowait(_Job(group, list(group.queries), list(self._futures[group.id])))

    # ------------------------------------------------------------------------------------------ background
    def _start(self) -> None:
        if self._jobs is None:
            self._jobs, self._wake = asyncio.Queue(), asyncio.Event()
        if not self._tasks or any(t.done() for t in self._tasks):  # the loops never end; restarted if killed
            for task in self._tasks:
                task.cancel()
            self._tasks = [asyncio.create_task(self._close_due_groups()), asyncio.create_task(self._grade_jobs())]

    async def _close_due_groups(self) -> None:
        while True:
            deadline = self.book.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            due = self.book.due(time.monotonic())
            if due:
                sizes = sorted(len(g.queries) for g in due)
                log.warning("%d group(s) timed out after %.1f s with %d-%d of %d members (e.g. prompt ...%r); "
                            "scored with the members that arrived", len(due), self.cfg.group_wait_s, sizes[0],
                            sizes[-1], self.cfg.n_samples_per_prompt, due[0].prompt[-60:])
            for group in due:
                self._submit(group)
            self._gauges()

    async def _grade_jobs(self) -> None:
        while True:
            jobs = [await self._jobs.get()]
            while len(jobs) < self.cfg.max_groups_per_grading and not self._jobs.empty():
                jobs.append(self._jobs.get_nowait())
            try:
                scored = await asyncio.to_thread(self._grade, jobs)
            except Exception as exc:  # nothing is cached: the client's retry is graded afresh
                log.exception("grading %d groups failed", len(jobs))
                for job in jobs:
                    self._finish(job, None, exc)
                continue
            for job, rewards in zip(jobs, scored):
                self._finish(job, rewards, None)
            self._gauges()

    def _grade(self, jobs: list[_Job]) -> list[list[RewardBreakdown]]:
        """Runs in a thread: split the responses out of the queries, grade in the worker pool, combine."""
        groups = [([split_response(q, j.group.prompt) for q in j.queries], j.group.label, self.kind_of(j.group.label))
                  for j in jobs]
        return batch_group_rewards(groups, self.cfg.confidence_reward, self.cfg.weights, [j.group.prompt for j in jobs])

    def _finish(self, job: _Job, rewards: list[RewardBreakdown] | None, exc: BaseException | None) -> None:
        pending = [(q, f, None if rewards is None else rewards[i])
                   for i, (q, f) in enumerate(zip(job.queries, job.resolve)) if f is not None]
        if rewards is None:
            self.book.forget(job.group, [q for q, _, _ in pending])
        else:
            self.book.remember(job.group, [q for q, _, _ in pending], [r for _, _, r in pending], time.monotonic())
        for _, fut, reward in pending:
            if not fut.done():
                fut.set_exception(exc) if rewards is None else fut.set_result(reward)
        if all(f is not None for f in job.resolve):  # a whole group (not a straggler): its futures are done
            self._futures.pop(job.group.id, None)

    def _gauges(self) -> None:
        self.metrics.open_groups.set(self.book.open_groups)
        self.metrics.cached.set(self.book.cached)


def create_app(service: GroupRewardService) -> FastAPI:
    """FastAPI app: ``POST cfg.route`` (OpenRLHF's reward request), ``GET /healthz``, ``GET /metrics``."""
    app = FastAPI(title="COREA group reward server")
    m = service.metrics

    def refuse(status: int, message: str, outcome: str = "client_error") -> JSONResponse:
        m.requests.labels(outcome).inc()
        return JSONResponse({"error": message}, status_code=status)

    @app.post(service.cfg.route)
    async def get_reward(request: Request):
        try:
            raw = await read_body(request, service.cfg.max_request_bytes)
        except ApiError as exc:
            return refuse(exc.status, exc.message)
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return refuse(400, f"the body is not JSON: {exc}")
        try:
            req = RewardRequest.model_validate(payload)
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
            return refuse(422, f"expected {{'query': [str], 'prompts': [str], 'labels': [str]}}: {fields}")
        try:
            body = await service.score(req)
        except BookFull as exc:
            return refuse(503, str(exc), "overloaded")
        except Exception as exc:
            log.exception("reward request failed")
            return refuse(500, f"grading failed: {exc}", "error")
        m.requests.labels("ok").inc()
        return JSONResponse(body)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "open_groups": service.book.open_groups,
                "n_samples_per_prompt": service.cfg.n_samples_per_prompt}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class ServerThread:
    """The app under uvicorn in a background thread (tests, notebooks); ``run_forever`` for the CLI."""

    def __init__(self, cfg: RewardServerConfig):
        import uvicorn

        self.service = GroupRewardService(cfg)
        config = uvicorn.Config(create_app(self.service), host=cfg.host, port=cfg.port, log_level="warning",
                                timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="corea-reward-server", daemon=True)

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        self.thread.start()
        end = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the reward server did not start (is the port free?)")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}{self.service.cfg.route}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def raise_open_files_limit(cfg: RewardServerConfig) -> int:
    """Raise this process's soft limit on open files to the hard limit: every held request is an open socket,
    and a rollout batch holds B x n of them (8192 for 1024 prompts x 8). Returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    needed = cfg.max_open_groups * cfg.n_samples_per_prompt
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("open-file limit %d is below max_open_groups x n = %d held requests; raise `ulimit -n` or "
                    "lower max_open_groups", soft, needed)
    return soft


def run_forever(cfg: RewardServerConfig) -> None:
    """Serve in the foreground until Ctrl-C."""
    import uvicorn

    raise_open_files_limit(cfg)
    log.info("reward server on http://%s:%d%s: groups of %d, %s confidence reward, %s grading, %.0f s wait",
             cfg.host, cfg.port, cfg.route, cfg.n_samples_per_prompt, cfg.confidence_reward, cfg.grading,
             cfg.group_wait_s)
    uvicorn.run(create_app(GroupRewardService(cfg)), host=cfg.host, port=cfg.port, log_level="warning",
                backlog=4096)
