"""A rollout worker killed mid-run is restarted, given the current weights, and no step is lost or doubled."""

import json
import threading
import time

import pytest
import ray

from corea.train.config import load_config
from corea.train.loop import train

pytestmark = pytest.mark.slow


def test_killed_rollout_worker_is_restarted(tmp_path):
    out = tmp_path / "run"
    cfg = load_config("configs/tiny-cpu-rlcc.yaml", {"output.dir": str(out), "optim.steps": 4, "name": "faults"})
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        result: dict = {}
        def run():
            try:
                result["last"] = train(cfg, progress=False)
            except BaseException as exc:  # surfaced below
                result["error"] = exc

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 600
        while not (metrics.exists() and metrics.read_text().strip()):
            assert time.time() < deadline and runner.is_alive(), "training never finished step 1"
            time.sleep(0.2)
        worker = ray.get_actor("faults-rollout-0")
        pid_before = ray.get(worker.pid.remote())
        ray.kill(worker, no_restart=False)
        runner.join(timeout=600)
        assert not runner.is_alive()
        assert "error" not in result, repr(result.get("error"))
        assert result["last"].name == "step_000004"
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # every step after the kill was rolled out with the trainer's current weights
    assert all(r["weights_version"] == r["step"] - 1 for r in rows)
    assert all(r["rollout_logprob_gap"] < 1e-3 for r in rows)
    assert pid_before > 0
