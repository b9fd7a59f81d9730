"""Two real RLCC steps on a local Ray cluster with tiny checkpoints, then resume."""

import json

import pytest
import ray
import torch
from safetensors.torch import load_file

from corea.engines import SamplingParams, load_engine
from corea.train.config import load_config
from corea.train.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_steps_then_resume(local_ray, tmp_path):
    out = tmp_path / "run"
    cfg = load_config("configs/tiny-cpu-rlcc.yaml", {"output.dir": str(out)})
    last = train(cfg, progress=False)
    assert last.name == "step_000002"

    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("reward/total", "reward/confidence", "pass_at_1", "ece", "confidence_output_ratio", "kl",
                    "entropy", "clip_fraction", "response_length", "time/rollout_s", "time/train_s", "time/sync_s"):
            assert key in r
    # step 2 was rolled out with the weights synced after step 1, and they are the trainer's weights
    assert rows[0]["weights_version"] == 0 and rows[1]["weights_version"] == 1
    assert rows[1]["rollout_logprob_gap"] < 1e-3
    assert (out / "tensorboard").is_dir()

    initial = load_file(str(out / "models" / "tiny-slm-seed0" / "model.safetensors"))
    trained = load_file(str(last / "hf" / "model.safetensors"))
    changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert len(changed) > len(initial) // 2

    # the checkpoint loads in the generation engine and generates
    engine = load_engine(str(last / "hf"))
    gen = engine.generate(["What is 1 + 1?"], SamplingParams(max_tokens=8, temperature=0))
    assert gen[0].samples[0].output_tokens >= 1

    # resume continues at step 3 with the same data order, each step logged once
    cfg3 = load_config("configs/tiny-cpu-rlcc.yaml", {"output.dir": str(out), "optim.steps": 3})
    last3 = train(cfg3, resume=True, progress=False)
    assert last3.name == "step_000003"
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["weights_version"] == 2 and rows[2]["rollout_logprob_gap"] < 1e-3
    state = json.loads((last3 / "trainer_state.json").read_text())
    assert state["step"] == 3
