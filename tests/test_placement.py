"""Where the training actors go (corea.train.placement) and how the driver waits for them (corea.train.pools).

The layouts of the paper configs are checked here without a cluster; tests/test_fake_multinode.py places the 7B
layout on Ray's fake multinode autoscaler, nodes starting from zero.
"""

from __future__ import annotations

import json
import logging

import pytest

from corea.configfile import ConfigError
from corea.train.config import load_config
from corea.train.placement import actor_gpus, reference_shards, training_bundles, training_layout

P5EN_GPUS, P5EN_CPUS = 8, 192
PAPER_7B = ["configs/paper-qwen2.5-7b-rlcc-l1.yaml", "configs/paper-qwen2.5-7b-rlvr.yaml",
            "configs/paper-qwen2.5-7b-brier.yaml"]
PAPER_32B = "configs/paper-qwen2.5-32b-rlcc-l1.yaml"


def _gpus(bundles):
    return sum(b.get("GPU", 0) for b in bundles)


@pytest.mark.parametrize("path", [*PAPER_7B, PAPER_32B])
def test_paper_layouts_are_node_sized_groups_with_the_policy_ranks_first(path):
    cfg = load_config(path)
    layout = training_layout(cfg)
    assert layout.strategy == "STRICT_PACK"  # a group never spans two nodes
    for bundles in layout.groups:
        assert _gpus(bundles) <= P5EN_GPUS and sum(b["CPU"] for b in bundles) <= P5EN_CPUS
    # the policy ranks fill whole nodes: the first groups hold only policy ranks, 8 per group
    policy_groups = sorted({s.group for s in layout.policy})
    assert policy_groups == list(range(cfg.resources.trainers // P5EN_GPUS))
    assert all(_gpus(layout.groups[g]) == P5EN_GPUS for g in policy_groups)
    assert not {s.group for s in layout.rollout} & set(policy_groups)
    # one rollout engine: one bundle of its TP GPUs, so its workers share a node
    tp = cfg.engine.options["tensor_parallel_size"]
    assert [layout.groups[s.group][s.bundle]["GPU"] for s in layout.rollout] == [tp] * cfg.resources.rollout_workers
    # every GPU of the nodes is used
    assert sum(map(_gpus, layout.groups)) == P5EN_GPUS * len(layout.groups)


def test_7b_two_nodes_policy_and_reference_shards_together_rollouts_apart():
    cfg = load_config(PAPER_7B[0])
    layout = training_layout(cfg)
    assert len(layout.groups) == 2
    assert {s.group for s in layout.policy} == {0} and {s.group for s in layout.rollout} == {1}
    assert layout.reference == layout.policy and reference_shards(cfg) == 8  # one shard beside each rank
    policy_gpus, reference_gpus = actor_gpus(cfg)
    assert policy_gpus + reference_gpus == cfg.resources.trainer_gpus == 1 and 0 < reference_gpus < 1
    assert layout.groups[0][0] == {"CPU": cfg.resources.trainer_cpus + cfg.resources.reference_cpus, "GPU": 1}


def test_32b_four_nodes_reference_shards_fill_the_last_rollout_node():
    cfg = load_config(PAPER_32B)
    layout = training_layout(cfg)
    assert len(layout.groups) == 4
    assert [len({s.group for s in layout.policy})] == [2]
    assert [s.group for s in layout.rollout] == [2, 2, 3]
    assert {s.group for s in layout.reference} == {3} and len(layout.reference) == 4
    assert actor_gpus(cfg) == (1, 1)


def test_one_group_without_gpus_per_node_and_the_flat_bundle_list():
    cfg = load_config("configs/tiny-cpu-rlcc.yaml", {"resources.reference_actors": "2"})
    layout = training_layout(cfg)
    assert layout.strategy == cfg.resources.placement_strategy and len(layout.groups) == 1
    assert len(layout.groups[0]) == 1 + 1 + 2 and len(layout.reference) == 2
    assert [b["CPU"] for b in training_bundles(cfg)] == [0.5, 0.5, 0.25, 0.25]  # rollout, policy, references


@pytest.mark.parametrize("overrides, match", [
    ({"resources.rollout_gpus": "16", "engine.options.tensor_parallel_size": "16"}, "resources.rollout_gpus"),
    ({"resources.reference_gpus": "1"}, "between 0 and resources.trainer_gpus"),
])
def test_layout_errors_name_the_field(overrides, match):
    cfg = load_config(PAPER_7B[0], overrides)
    with pytest.raises(ConfigError, match=match):
        training_layout(cfg)


# ------------------------------------------------------------------------------------------- on Ray
@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def test_placement_that_cannot_happen_fails_naming_what_and_logs_while_it_waits(local_ray, caplog):
    from ray.util.placement_group import placement_group_table

    from corea.train.pools import place

    cfg = load_config(PAPER_7B[0])
    layout = training_layout(cfg)
    with caplog.at_level(logging.INFO, logger="corea.train.pools"):
        with pytest.raises(RuntimeError) as failed:
            place(layout, "unplaceable", timeout_s=3, log_every_s=1)
    message = str(failed.value)
    assert "cannot place 2 of 2 placement groups within 3 s (resources.placement_timeout_s)" in message
    assert "STRICT_PACK" in message and "'GPU': 1.0" in message and "1 nodes alive" in message
    waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waits and "for placement" in waits[0] and "nodes alive" in waits[0]
    # nothing is left holding resources
    states = {t["name"]: t["state"] for t in placement_group_table().values()}
    assert {s for n, s in states.items() if n.startswith("unplaceable")} == {"REMOVED"}
    json.dumps(states)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reference_shards_score_their_slices_in_order(local_ray, tmp_path):
    """One step with two reference shards: at the first update the policy equals the reference, so the logged KL
    is ~0 only if every sequence got its own reference log-probs back (a shifted slice gives KL of order 1)."""
    from corea.train.loop import train

    out = tmp_path / "run"
    cfg = load_config("configs/tiny-cpu-rlcc.yaml", {
        "output.dir": str(out), "optim.steps": "1", "optim.train_batch_prompts": "4", "resources.reference_actors": "2",
        "resources.reference_cpus": "0.1", "output.tensorboard": "false"})
    train(cfg, progress=False)
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(row["kl"]) < 1e-4
