"""The math-verify worker pool behind ``corea.grading.Grader``: jobs to idle workers, deadlines, replacements.

Each job is one gold and up to a chunk of responses; a worker sends one verdict per response. A worker that
misses ``timeout_s + KILL_GRACE_S`` after its last message (stuck in C code) or dies is killed and replaced;
the response it was on is False and the rest of its job goes to another worker. A job whose gold never
parsed is retried once (the worker may have been killed from outside), then its gold counts as failed.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _wait_any
from typing import Callable

from corea.grading.worker import _Worker

KILL_GRACE_S = 2.0  #: extra time before a worker that misses its deadline is killed, seconds
STARTUP_TIMEOUT_S = 120.0  #: time a new worker may take to import math-verify, seconds


class Job:
    """Responses to grade against one gold in one worker; ``done`` counts the verdicts received."""

    __slots__ = ("gold", "answers", "worker", "deadline", "gold_parsed", "done", "retried")

    def __init__(self, gold: str, answers: list[str], retried: bool = False):
        self.gold, self.answers, self.worker, self.deadline, self.gold_parsed, self.done = gold, answers, None, 0, 0, 0
        self.retried = retried


class WorkerPool:
    """``processes`` math-verify workers, started on first use; ``count(name, n)`` receives the workers'
    ``rejected``/``deadline`` counts and ``killed``. Thread-safe."""

    def __init__(self, processes: int, timeout_s: float, memory_limit_mb: int | None,
                 count: Callable[[str, int], None]):
        self.processes, self.timeout_s, self.memory_limit_mb, self.count = processes, timeout_s, memory_limit_mb, count
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers: set[_Worker] = set()
        self._lock = threading.Lock()
        self._started = self.closed = False

    def warmup(self) -> None:
        """Start every worker and wait until each has imported and warmed up math-verify."""
        self.run(deque(Job("1", ["\\boxed{1}"]) for _ in range(self.processes)))

    def pids(self) -> list[int]:
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

    def run(self, jobs: deque[Job]) -> dict[tuple[str, str], tuple[bool, bool]]:
        """Send jobs to idle workers, collect per-response (verdict, decided by the first match), enforce the
        deadlines."""
        results: dict[tuple[str, str], tuple[bool, bool]] = {}
        active: dict[Connection, Job] = {}
        failed_golds: set[str] = set()
        step_s = self.timeout_s + KILL_GRACE_S
        try:
            while jobs or active:
                while jobs:
                    if jobs[0].gold in failed_golds:
                        failed = jobs.popleft()
                        results.update(((failed.gold, a), (False, False)) for a in failed.answers)
                        continue
                    if (worker := self._acquire(block=not active)) is None:
                        break
                    try:
                        if worker.proc.poll() is not None:
                            raise BrokenPipeError("worker exited while idle")
                        worker.conn.send((jobs[0].gold, jobs[0].answers, self.timeout_s))
                    except OSError:  # died while idle (killed from outside): nothing was started, so retry
                        self._replace(worker)
                        continue
                    job = jobs.popleft()
                    job.worker = worker
                    job.deadline = time.monotonic() + (step_s if worker.ready else STARTUP_TIMEOUT_S)
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
                                results[(job.gold, job.answers[job.done])] = (message[1], message[3])
                                job.done += 1
                                if message[2]:
                                    self.count(message[2], 1)
                            job.deadline = time.monotonic() + step_s
                    except (EOFError, OSError):  # the worker died: handled like a missed deadline
                        job.deadline = -1.0
                    if job.done == len(job.answers):
                        del active[conn]
                        self._idle.put(job.worker)
                now = time.monotonic()
                for conn, job in [(c, j) for c, j in active.items() if j.deadline <= now]:
                    del active[conn]
                    self._replace(job.worker)
                    self.count("killed", 1)
                    if not job.worker.ready:
                        raise RuntimeError("a grading worker failed to start (is math-verify installed?)")
                    if not job.gold_parsed and job.deadline == -1.0 and not job.retried:
                        jobs.appendleft(Job(job.gold, job.answers, retried=True))  # died (killed?): once more
                        continue
                    if not job.gold_parsed:  # the gold itself is the culprit
                        failed_golds.add(job.gold)
                        results.update(((job.gold, a), (False, False)) for a in job.answers)
                        continue
                    results[(job.gold, job.answers[job.done])] = (False, False)
                    if rest := job.answers[job.done + 1 :]:
                        jobs.appendleft(Job(job.gold, rest))
        finally:
            for job in active.values():  # interrupted: these workers may still send stale messages
                self._replace(job.worker)
        return results
