"""Pipelined rollouts (``rollout.max_staleness``), exact resume with a batch in flight, faults while a batch is
in flight, and the zero-variance group filter, on a local Ray cluster with tiny checkpoints."""

import json
import shutil

import pytest
import ray

from corea.train.config import load_config
from support import BackgroundTraining
from corea.train.loop import train
from corea.train.pipeline import INFLIGHT_FILE, refill_indices, to_sequences

COMPARED = ("reward/total", "pass_at_1", "loss", "policy_loss", "kl", "entropy", "response_length", "weights_version")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _cfg(out, **overrides):
    base = {"output.dir": str(out), "name": out.name, "optim.steps": 3, "rollout.prompts_per_step": 2,
            "optim.train_batch_prompts": 1, "output.tensorboard": False}
    return load_config("configs/tiny-cpu-rlcc.yaml", {**base, **overrides})


def test_refill_draw_and_sequences_are_pure():
    assert refill_indices(10, 3, 1, 4, 0) == refill_indices(10, 3, 1, 4, 0)
    assert refill_indices(10, 3, 1, 4, 0) != refill_indices(10, 3, 2, 4, 0)
    assert sorted(refill_indices(3, 1, 1, 5, 0)) == [0, 1, 2]  # never more than the records, no repeats
    rollouts = [{"prompt_ids": [1], "samples": [{"token_ids": [2], "logprobs": [-0.5]}] * 2}]
    rewards = [[{"total": 1.0}, {"total": 3.0}]]
    assert [s.advantage for s in to_sequences(rollouts, rewards, 2, std_normalize=False)] == [-1.0, 1.0]
    assert [round(s.advantage, 4) for s in to_sequences(rollouts, rewards, 2)] == [-1.0, 1.0]
    assert to_sequences([], [], 2) == []


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("staleness", [0, 1])
def test_resume_equals_uninterrupted(local_ray, tmp_path, staleness):
    """3 steps straight vs resumed at step 3 from the uninterrupted run's step-2 checkpoint (its in-flight
    batch included): step 3 is the same step."""
    a, b = tmp_path / f"straight{staleness}", tmp_path / f"resumed{staleness}"
    train(_cfg(a, **{"rollout.max_staleness": staleness}), progress=False)
    rows = _rows(a)
    assert [r["step"] for r in rows] == [1, 2, 3]
    if staleness:
        # step j+1 is rolled out while step j trains: sampled with the weights before step j's update
        assert [r["weights_version"] for r in rows] == [0, 0, 1]
        assert [r["staleness"] for r in rows] == [0, 1, 1]
        assert rows[1]["rollout_logprob_gap"] > 1e-4  # the ratio really is off-policy
        saved = json.loads((a / "checkpoints" / "step_000002" / INFLIGHT_FILE).read_text())
        assert list(saved) == ["3"] and saved["3"][0]["weights_version"] == 1
    else:
        assert [r["staleness"] for r in rows] == [0, 0, 0]
        assert not (a / "checkpoints" / "step_000002" / INFLIGHT_FILE).exists()
    shutil.copytree(a / "checkpoints" / "step_000002", b / "checkpoints" / "step_000002")
    shutil.copytree(a / "models", b / "models")
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    train(_cfg(b, **{"rollout.max_staleness": staleness}), resume=True, progress=False)
    resumed = _rows(b)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in COMPARED:
        assert resumed[2][key] == pytest.approx(rows[2][key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_killed_actors_while_a_batch_is_in_flight(local_ray, tmp_path):
    """max_staleness 1 with zero-std filtering and refill: the rollout worker is killed while it generates the
    next step's batch, then the reward actor; no step is lost or doubled, none trains on an older batch."""
    out = tmp_path / "async-faults"
    cfg = _cfg(out, **{"optim.steps": 4, "rollout.max_staleness": 1, "advantage.filter_groups": "zero_std",
                       "advantage.refill": True, "advantage.max_refill_rounds": 1})
    training = BackgroundTraining(cfg)
    result = training.result
    training.wait_rows(1)
    ray.kill(ray.get_actor(f"{cfg.name}-rollout-0"), no_restart=False)  # step 2's or 3's batch is in flight
    training.wait_rows(2)
    ray.kill(ray.get_actor(f"{cfg.name}-reward-0"), no_restart=False)
    training.join()
    assert "error" not in result, repr(result.get("error"))
    assert result["last"].name == "step_000004"
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(0 <= r["staleness"] <= 1 for r in rows)
    for r in rows:
        assert 0.0 <= r["filter/filtered_fraction"] <= 1.0 and r["filter/trained_groups"] == 2
        assert r["filter/refill_rounds"] == (1.0 if r["groups/zero_std_fraction"] > 0 else 0.0)


def test_reward_actor_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, corea.train.reward_actor; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
