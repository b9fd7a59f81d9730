"""Policy precision settings against DeepSpeed's own config parser, and the entropy kept out of the graph."""

import pytest
import torch

from corea.train.config import OptimConfig
from corea.train.zero_params import ds_config


def test_bf16_accumulates_gradients_in_fp32_per_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(ds_config(4, 64, 3, "bf16"))
    assert parsed.bfloat16_config.enabled and parsed.grad_accum_dtype == "fp32"
    assert parsed.zero_optimization_stage == 3 and parsed.gradient_accumulation_steps == 64
    fp32 = DeepSpeedConfig(ds_config(4, 2, 1, "fp32"))
    assert not fp32.bfloat16_config.enabled and fp32.grad_accum_dtype is None


def test_bf16_without_zero_is_refused():
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        ds_config(4, 2, 0, "bf16")
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        OptimConfig(precision="bf16", zero_stage=0)
    OptimConfig(precision="bf16", zero_stage=2)


def test_entropy_without_grad_keeps_logprobs_differentiable(tiny_checkpoints):
    from corea.models import load_model_and_tokenizer
    from corea.train.sequences import RolloutSequence, pack, score

    model, _ = load_model_and_tokenizer(tiny_checkpoints["slm"], "float32", "cpu")
    batch = pack([RolloutSequence([5, 6, 7], [8, 9]), RolloutSequence([5, 6], [10, 11, 12])], 0)
    logp, entropy = score(model, batch, with_entropy=True, entropy_grad=False)
    assert logp.requires_grad and not entropy.requires_grad
    logp_g, entropy_g = score(model, batch, with_entropy=True)
    assert entropy_g.requires_grad
    torch.testing.assert_close(entropy, entropy_g.detach())
    assert float(entropy.mean()) > 0
