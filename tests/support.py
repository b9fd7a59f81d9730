"""Helpers shared by several test modules (imported as `support`; pytest puts `tests/` on `sys.path`)."""

import socket
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_running(name: str, timeout: float = 180.0) -> None:
    """Poll ``serve.status()`` until the Serve application ``name`` is RUNNING; fail fast on DEPLOY_FAILED."""
    from ray import serve

    deadline = time.time() + timeout
    while time.time() < deadline:
        app = serve.status().applications.get(name)
        status = getattr(app.status, "value", app.status) if app is not None else None
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise AssertionError(f"{name} failed to deploy: {app.message}")
        time.sleep(0.5)
    raise AssertionError(f"{name} not RUNNING after {timeout} s: {serve.status().applications.get(name)}")


def metrics(url) -> dict[tuple, float]:
    """The Prometheus samples at ``url/metrics`` as {(name, sorted labels): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(after, before, name, **labels):
    """How much the sample ``name{labels}`` grew between two `metrics` snapshots."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def record_rows(model, dataset, table, prompt=10, output=5, mtp=None):
    """Evaluation records made by hand. table: {(id, run): (confidence, correct)}; mtp: {(id, run): prob}."""
    out = []
    for (qid, run), (conf, y) in table.items():
        out.append({"dataset": dataset, "id": qid, "run": run, "model": model, "answer": "x",
                    "confidence": np.nan if conf is None else conf, "correct": bool(y), "prompt_tokens": prompt,
                    "output_tokens": output, "mean_token_prob": (mtp or {}).get((qid, run), 0.5)})
    return out


class BackgroundTraining:
    """``corea.train.loop.train(cfg)`` in a daemon thread, so a test can kill actors while it runs; ``result``
    holds ``last`` (the final checkpoint) or ``error``."""

    def __init__(self, cfg, timeout_s: float = 600.0):
        import threading

        from corea.train.loop import train

        self.metrics = Path(cfg.output.dir) / "metrics.jsonl"
        self.deadline = time.time() + timeout_s
        self.result: dict = {}

        def run():
            try:
                self.result["last"] = train(cfg, progress=False)
            except BaseException as exc:  # surfaced by the test
                self.result["error"] = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait_rows(self, n: int, poll_s: float = 0.05) -> None:
        """Block until ``metrics.jsonl`` has ``n`` step rows (fails if training stops or the deadline passes)."""
        while not (self.metrics.exists() and len(self.metrics.read_text().splitlines()) >= n):
            assert time.time() < self.deadline and self.thread.is_alive(), \
                f"training never finished step {n}: {self.result}"
            time.sleep(poll_s)

    def join(self, timeout_s: float = 600.0) -> None:
        self.thread.join(timeout=timeout_s)
        assert not self.thread.is_alive()


def stop_cluster(temp_dir: str) -> None:
    """Stop this test's cluster only (`ray stop` would stop every Ray cluster on the machine): its processes
    are the ones whose command line names its temp dir, plus their children."""
    import psutil

    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                procs += [proc, *proc.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        proc.kill()


def write_quiet_policy(path) -> Path:
    """A stepwise routing policy file whose P(call the LLM) is ~0 for any step: at tau 0 it always calls the LLM
    (P >= 0), at any tau > 0 never."""
    import torch

    from corea.collab.policy import StepPolicy

    policy = StepPolicy(seed=0)
    with torch.no_grad():
        policy.net[-1].bias.fill_(-30.0)
    Path(path).write_text(policy.to_json())
    return Path(path)
