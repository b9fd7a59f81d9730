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
