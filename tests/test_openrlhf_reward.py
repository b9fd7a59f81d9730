"""The OpenRLHF reward file, loaded and called the way OpenRLHF loads a ``--remote_rm_url`` python file."""

import importlib.util
from pathlib import Path

import pytest
import torch

import corea.integrations

FILE = Path(corea.integrations.__file__).parent / "openrlhf_reward.py"


def _load():
    spec = importlib.util.spec_from_file_location("reward_func", str(FILE))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reward_func


def test_sample_level_rewards(monkeypatch):
    reward_func = _load()
    prompts = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "Q: pick one\n"]
    responses = ["so \\boxed{4} \\confidence{0.8}", "\\boxed{C} \\confidence{0.3}"]
    queries = [p + r for p, r in zip(prompts, responses)]
    out = reward_func(queries, prompts, ["4", "B"])
    assert isinstance(out["rewards"], torch.Tensor) and out["rewards"].shape == (2,)
    # brier: correct with c=0.8 -> 1 + 1 - 0.04; wrong with c=0.3 -> 0 + 1 - 0.09
    assert out["rewards"].tolist() == pytest.approx([1.96, 0.91])
    assert out["extra_logs"]["correctness"].tolist() == [1.0, 0.0]

    monkeypatch.setenv("COREA_CONFIDENCE_REWARD", "sample_l1")
    out = reward_func(queries, prompts, ["4", "B"])
    assert out["rewards"].tolist() == pytest.approx([1.8, 0.7])


def test_group_level_reward_refused(monkeypatch):
    monkeypatch.setenv("COREA_CONFIDENCE_REWARD", "l1")
    with pytest.raises(ValueError, match="RewardActor"):
        _load()(["a"], ["a"], ["1"])
