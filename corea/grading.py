"""Answer grading: is an extracted answer equivalent to the gold answer?

Kinds: ``"math"`` (math-verify equivalence) and ``"choice"`` (exact letter match, A-J). Three tiers, cheapest first:

1. Fast path, in-process, no sympy: plain numbers (integers, decimals, ``a/b``, ``\\frac{a}{b}``, thousands commas,
   ``\\$``, ``\\%``, a trailing ``\\text{unit}``), choice letters, word answers (``Yes``, ``\\text{Evelyn}``) and
   answers spelled like the gold. Numbers follow math-verify's rules: two integers compare exactly (a percent
   sign is ignored: 10\\% = 10); with a decimal on either side the values must agree to 6 decimal places;
   otherwise rationals compare exactly.
2. Pre-screen, in-process: an answer that would make sympy hang is False in microseconds: longer than
   max(20 * len(gold), 500) characters, brackets nested deeper than 50, an exponent above 1e5 (power towers
   included), a symbolic power expanding to more than 500 monomials, a factorial of more than 1e5. A limit
   grows to twice the gold's own figure when the gold itself is that large.
3. Worker pool: math-verify in ``Grader.processes`` worker processes (fresh interpreters), each gold parsed once
   per worker. Every step (one gold parse, one answer) has a deadline of ``TIMEOUT_S`` seconds; a worker that
   misses it is killed and replaced, that answer is False and the answers queued behind it are re-sent.
   Math-verify's signal-based timeouts are off (``parsing_timeout=None``, ``timeout_seconds=None``), so grading
   works from any thread, asyncio loop, Ray actor or Serve replica. Model output is only read by math-verify's
   parser, never evaluated.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import math
import queue
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _wait_any
from typing import Sequence

from corea.answer_checks import (  # noqa: F401 (the limits and prescreen are part of this module's API)
    KINDS,
    MAX_EXPONENT_LOG10,
    MAX_FACTORIAL_LOG10,
    MAX_MONOMIALS_LOG10,
    MAX_NESTING,
    _clean,
    _Gold,
    prescreen,
)
from corea.grading_worker import MEMORY_LIMIT_MB, _Worker
from corea.protocol import parse_response

TIMEOUT_S = 5.0  #: deadline of one grading step (a gold parse or one answer) in a worker, seconds
STARTUP_TIMEOUT_S = 120.0  #: time a new worker may take to import math-verify, seconds
_CHUNK_MAX = 64  # answers sent to a worker at once (verdicts still come back one by one)


class _Job:
    __slots__ = ("gold", "answers", "worker", "deadline", "gold_parsed", "done")

    def __init__(self, gold: str, answers: list[str]):
        self.gold, self.answers, self.worker, self.deadline, self.gold_parsed, self.done = gold, answers, None, 0, 0, 0


class Grader:
    """A pool of ``processes`` math-verify workers, started on first need; every method is thread-safe."""

    def __init__(self, processes: int | None = None, timeout_s: float = TIMEOUT_S,
                 memory_limit_mb: int | None = MEMORY_LIMIT_MB):
        self.processes = max(1, int(processes or os.cpu_count() or 1))
        self.timeout_s, self.memory_limit_mb, self.pid = float(timeout_s), memory_limit_mb, os.getpid()
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers: set[_Worker] = set()
        self._lock = threading.Lock()
        self._started = self.closed = False

    def grade(self, response: str | bytes, gold: str, kind: str = "math") -> bool:
        """Grade a full response: its last \\boxed{} against ``gold``."""
        return self.grade_answer(parse_response(response).answer, gold, kind)

    def grade_answer(self, answer: str | bytes | None, gold: str, kind: str = "math") -> bool:
        """Grade an extracted answer against ``gold``."""
        return self.grade_groups([([answer], gold, kind)])[0][0]

    def grade_groups(self, groups: Sequence[tuple[Sequence[str | bytes | None], str, str]]) -> list[list[bool]]:
        """Verdicts for groups of (answers, gold, kind): fast path, pre-screen, then the pool for the rest."""
        verdicts: list[list[bool]] = []
        pending: dict[tuple[str, str], list[tuple[int, int]]] = {}  # distinct (gold, answer) -> positions
        for gi, (answers, gold, kind) in enumerate(groups):
            prepared, row = _Gold(gold, kind), []
            for ai, answer in enumerate(map(_clean, answers)):
                verdict = prepared.fast(answer) if answer else False
                if verdict is None and not prepared.rejects(answer):
                    pending.setdefault((prepared.text, answer), []).append((gi, ai))
                row.append(bool(verdict))
            verdicts.append(row)
        if pending:
            by_gold: dict[str, list[str]] = {}
            for gold, answer in pending:
                by_gold.setdefault(gold, []).append(answer)
            size = max(1, min(_CHUNK_MAX, math.ceil(len(pending) / (2 * self.processes))))
            jobs = deque(_Job(g, a[i : i + size]) for g, a in by_gold.items() for i in range(0, len(a), size))
            for key, verdict in self._run(jobs).items():
                for gi, ai in pending[key]:
                    verdicts[gi][ai] = verdict
        return verdicts

    def warmup(self) -> None:
        """Start every worker and wait until each has imported and warmed up math-verify."""
        self._run(deque(_Job("1", ["1"]) for _ in range(self.processes)))

    def worker_pids(self) -> list[int]:
        return sorted(w.proc.pid for w in list(self._workers))

    def close(self) -> None:
        """Stop the workers; a second call does nothing."""
        with self._lock:
            if self.closed:
                return
            self.closed, workers = True, list(self._workers)
        for w in workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        end = time.monotonic() + 1.0
        for w in workers:
            try:
                w.proc.wait(max(0.01, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            w.kill()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add_worker(self) -> None:  # self._lock held
        worker = _Worker(self.memory_limit_mb)
        self._workers.add(worker)
        self._idle.put(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._workers.discard(worker)
            if not self.closed:
                self._add_worker()

    def _acquire(self, block: bool) -> _Worker | None:
        with self._lock:
            if not self._started and not self.closed:
                self._started = True
                for _ in range(self.processes):
                    self._add_worker()
        while not self.closed:
            try:
                return self._idle.get(timeout=0.5) if block else self._idle.get_nowait()
            except queue.Empty:
                if not block:
                    return None
        raise RuntimeError("the grader is closed")

    def _run(self, jobs: deque[_Job]) -> dict[tuple[str, str], bool]:
        """Send jobs to idle workers, collect per-answer verdicts, enforce the per-step deadlines."""
        results: dict[tuple[str, str], bool] = {}
        active: dict[Connection, _Job] = {}
        failed_golds: set[str] = set()
        try:
            while jobs or active:
                while jobs:
                    if jobs[0].gold in failed_golds:
                        results.update(((jobs[0].gold, a), False) for a in jobs.popleft().answers)
                        continue
                    if (worker := self._acquire(block=not active)) is None:
                        break
                    try:
                        if worker.proc.poll() is not None:
                            raise BrokenPipeError("worker exited while idle")
                        worker.conn.send((jobs[0].gold, jobs[0].answers))
                    except OSError:  # died while idle (killed from outside): nothing was started, so retry
                        self._replace(worker)
                        continue
                    job = jobs.popleft()
                    job.worker = worker
                    job.deadline = time.monotonic() + (self.timeout_s if worker.ready else STARTUP_TIMEOUT_S)
                    active[worker.conn] = job
                if not active:
                    continue
                wait_s = max(0.0, min(j.deadline for j in active.values()) - time.monotonic())
                for conn in _wait_any(list(active), wait_s):
                    job = active[conn]
                    try:
                        while job.done < len(job.answers) and conn.poll():
                            message = conn.recv()
                            if message[0] == "ready":
                                job.worker.ready = True
                            elif message[0] == "gold":
                                job.gold_parsed = True
                            else:
                                results[(job.gold, job.answers[job.done])] = message[1]
                                job.done += 1
                            job.deadline = time.monotonic() + self.timeout_s
                    except (EOFError, OSError):  # the worker died: handled like a missed deadline
                        job.deadline = -1.0
                    if job.done == len(job.answers):
                        del active[conn]
                        self._idle.put(job.worker)
                now = time.monotonic()
                for conn, job in [(c, j) for c, j in active.items() if j.deadline <= now]:
                    del active[conn]
                    self._replace(job.worker)
                    if not job.worker.ready:
                        raise RuntimeError("a grading worker failed to start (is math-verify installed?)")
                    if not job.gold_parsed:  # the gold itself is the culprit
                        failed_golds.add(job.gold)
                        results.update(((job.gold, a), False) for a in job.answers)
                        continue
                    results[(job.gold, job.answers[job.done])] = False
                    if rest := job.answers[job.done + 1 :]:
                        jobs.appendleft(_Job(job.gold, rest))
        finally:
            for job in active.values():  # interrupted: these workers may still send stale messages
                self._replace(job.worker)
        return results


# ---------------------------------------------------------------------------------------- module defaults
_default: Grader | None = None
_default_lock = threading.Lock()


def get_grader() -> Grader:
    """The process-wide grader, created on first use (a forked child gets its own)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed or _default.pid != os.getpid():
            _default = Grader()
        return _default


def configure(**grader_kwargs) -> Grader:
    """Replace the process-wide grader by ``Grader(**grader_kwargs)``, closing the old one; return it."""
    global _default
    with _default_lock:
        old, _default = _default, Grader(**grader_kwargs)
    if old is not None and old.pid == os.getpid():
        old.close()
    return _default


@atexit.register
def _close_default() -> None:
    if _default is not None and _default.pid == os.getpid():
        _default.close()


def grade(response: str | bytes, gold: str, kind: str = "math") -> bool:
    """Grade a full response (its last \\boxed{}) against ``gold``; no answer is False."""
    return get_grader().grade(response, gold, kind)


def grade_answer(answer: str | bytes | None, gold: str, kind: str = "math") -> bool:
    """Grade an already-extracted answer against ``gold``."""
    return get_grader().grade_answer(answer, gold, kind)


def grade_groups(groups: Sequence[tuple[Sequence[str | bytes | None], str, str]]) -> list[list[bool]]:
    """Verdicts for (answers, gold, kind) groups; each gold is prepared once, slow answers run in parallel."""
    return get_grader().grade_groups(groups)
