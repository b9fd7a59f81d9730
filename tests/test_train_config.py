import glob

import pytest

from corea.train.checkpoints import prompt_indices, truncate_jsonl
from corea.train.config import ConfigError, load_config


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*rl*.yaml")) + sorted(glob.glob("configs/paper-*.yaml")))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.rollout.n >= 2


def test_paper_settings():
    cfg = load_config("configs/paper-qwen2.5-7b-rlcc-l1.yaml")
    assert (cfg.rollout.n, cfg.rollout.prompts_per_step, cfg.optim.train_batch_prompts, cfg.rollout.max_tokens) == (8, 1024, 256, 4096)
    assert cfg.rollout.temperature == 1.0 and cfg.engine.backend == "vllm" and cfg.optim.precision == "bf16"
    assert load_config("configs/paper-qwen2.5-7b-rlvr.yaml").reward.confidence_reward == "none"
    assert load_config("configs/paper-qwen2.5-7b-brier.yaml").reward.confidence_reward == "brier"


@pytest.mark.parametrize(
    "override,field",
    [
        ({"optim.lr": -1}, "optim.lr"),
        ({"reward.confidence_reward": "l3"}, "confidence_reward"),
        ({"rollout.n": 1}, "rollout.n"),
        ({"engine.backend": "tgi"}, "engine.backend"),
        ({"optim.unknown_knob": 3}, "optim.unknown_knob"),
        ({"optim.train_batch_prompts": 3}, "train_batch_prompts"),
        ({"optim.loss_agg": "sum"}, "optim.loss_agg"),
        ({"advantage.filter_groups": "all"}, "advantage.filter_groups"),
        ({"advantage.refill": True}, "filter_groups"),
        ({"optim.importance_cap": 2.0}, "max_staleness"),
        ({"rollout.max_staleness": -1}, "rollout.max_staleness"),
    ],
)
def test_invalid_config_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("configs/tiny-cpu-rlcc.yaml", override)


def test_dr_grpo_normalizer_defaults_to_max_tokens():
    cfg = load_config("configs/tiny-cpu-rlcc.yaml", {"optim.loss_agg": "seq_mean_token_sum_norm", "rollout.max_tokens": 40})
    assert cfg.optim.loss_norm_tokens == 40 and cfg.advantage.std_normalize and cfg.rollout.max_staleness == 0


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_prompt_order_is_a_pure_function_of_step():
    a = [prompt_indices(10, s, 4, seed=0) for s in (1, 2, 3)]
    assert a == [prompt_indices(10, s, 4, seed=0) for s in (1, 2, 3)]
    # the first epoch is a permutation: steps 1-2 and the first half of step 3 cover all 10 indices once
    assert sorted(a[0] + a[1] + a[2][:2]) == list(range(10))
    assert prompt_indices(10, 1, 4, seed=1) != a[0]


def test_truncate_metrics(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    truncate_jsonl(f, 2)
    assert f.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_nccl_rank_plan():
    from corea.train.weight_sync import worker_rank_offsets

    assert worker_rank_offsets(3, 4) == ([1, 5, 9], 13)
    assert worker_rank_offsets(1, 1) == ([1], 2)


def test_weight_sync_strategy_follows_the_config():
    from corea.train import weight_sync

    def strategy(path):
        cfg = load_config(path)
        return type(weight_sync.make_weight_sync(cfg.engine.backend, cfg.resources.trainer_gpus, [], [], 1,
                                                 None, cfg.out_dir / "weights"))

    assert strategy("configs/paper-qwen2.5-7b-rlcc-l1.yaml") is weight_sync.NcclSync
    assert strategy("configs/tiny-cpu-rlcc.yaml") is weight_sync.ObjectStoreSync
    cpu_vllm = load_config("configs/tiny-cpu-rlcc.yaml", {"engine.backend": "vllm"})
    assert type(weight_sync.make_weight_sync("vllm", cpu_vllm.resources.trainer_gpus, [], [], 1, None,
                                             "w")) is weight_sync.FolderSync
