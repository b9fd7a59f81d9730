"""A rollout worker killed mid-run is restarted, given the current weights, and no step is lost or doubled."""

import json

import pytest
import ray

from corea.train.config import load_config
from support import BackgroundTraining

pytestmark = pytest.mark.slow


def test_killed_rollout_worker_is_restarted(tmp_path):
    out = tmp_path / "run"
    cfg = load_config("configs/tiny-cpu-rlcc.yaml", {"output.dir": str(out), "optim.steps": 4, "name": "faults"})
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        training = BackgroundTraining(cfg)
        result = training.result
        training.wait_rows(1, poll_s=0.2)
        worker = ray.get_actor("faults-rollout-0")
        pid_before = ray.get(worker.pid.remote())
        ray.kill(worker, no_restart=False)
        training.join()
        assert "error" not in result, repr(result.get("error"))
        assert result["last"].name == "step_000004"
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in training.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # every step after the kill was rolled out with the trainer's current weights
    assert all(r["weights_version"] == r["step"] - 1 for r in rows)
    assert all(r["rollout_logprob_gap"] < 1e-3 for r in rows)
    assert pid_before > 0
