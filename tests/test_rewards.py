import math

import pytest

from corea import rewards
from corea.rewards import RewardWeights, batch_group_rewards, group_rewards


def resp(answer, conf):
    box = f"\\boxed{{{answer}}}" if answer is not None else "no box"
    c = f" \\confidence{{{conf}}}" if conf is not None else ""
    return f"Reasoning... {box}{c}"


def test_pointwise_rewards_hand_computed():
    assert rewards.l1_reward(0.9, 0.25) == pytest.approx(-0.65)
    assert rewards.l2_reward(0.9, 0.25) == pytest.approx(-0.4225)
    eps = rewards.KL_EPS
    # p=1: log(c)/|log eps|
    assert rewards.kl_reward(0.5, 1.0) == pytest.approx(math.log(0.5) / abs(math.log(eps)))
    # c clipped: p=1, c=0 -> log(eps)/|log eps| = -1 (the floor)
    assert rewards.kl_reward(0.0, 1.0) == pytest.approx(-1.0)
    assert rewards.kl_reward(1.0, 0.0) == pytest.approx(-1.0)
    # p=0.25, c=0.5: (0.25 ln .5 + .75 ln .5)/|ln eps| = ln .5/|ln eps|
    assert rewards.kl_reward(0.5, 0.25) == pytest.approx(math.log(0.5) / abs(math.log(eps)))
    # maximised at c = p
    best = rewards.kl_reward(0.3, 0.3)
    assert all(rewards.kl_reward(c, 0.3) < best for c in (0.1, 0.2, 0.4, 0.9))


def test_group_accuracy():
    assert rewards.group_accuracy([True, False, False, True]) == 0.5
    with pytest.raises(ValueError):
        rewards.group_accuracy([])


@pytest.mark.parametrize(
    "kind,conf,correct,p,expected",
    [
        ("l1", 0.8, True, 0.25, -0.55),
        ("l2", 0.8, True, 0.25, -(0.55**2)),
        ("sample_l1", 0.8, True, 0.25, -0.2),
        ("brier", 0.8, False, 0.25, -0.64),
        ("sample_l2", 0.8, False, 0.25, -0.64),
        ("none", 0.8, False, 0.25, 0.0),
        ("l1", None, True, 0.25, -1.0),
        ("brier", None, True, 1.0, -1.0),
        ("none", None, True, 1.0, 0.0),
    ],
)
def test_confidence_reward_table(kind, conf, correct, p, expected):
    assert rewards.confidence_reward(kind, conf, correct, p) == pytest.approx(expected)


def test_sample_kl_uses_own_correctness():
    assert rewards.confidence_reward("sample_kl", 0.5, True, 0.0) == pytest.approx(rewards.kl_reward(0.5, 1.0))
    assert rewards.confidence_reward("kl", 0.5, True, 0.0) == pytest.approx(rewards.kl_reward(0.5, 0.0))


def test_unknown_reward_rejected():
    with pytest.raises(ValueError, match="unknown confidence reward"):
        rewards.confidence_reward("l3", 0.5, True, 0.5)
    with pytest.raises(ValueError, match="unknown confidence reward"):
        group_rewards([resp("1", 0.5)], "1", confidence_reward="l3")


def test_group_some_correct_l1():
    # gold 4; two right, two wrong -> p = 0.5
    out = group_rewards([resp("4", 0.9), resp("4", 0.5), resp("5", 0.2), resp("7", None)], "4")
    assert [o.correct for o in out] == [True, True, False, False]
    assert all(o.group_accuracy == 0.5 for o in out)
    assert [o.confidence_reward for o in out] == pytest.approx([-0.4, 0.0, -0.3, -1.0])
    assert [o.format for o in out] == pytest.approx([1.0, 1.0, 1.0, 0.5])
    assert [o.total for o in out] == pytest.approx([1.6, 2.0, 0.7, -0.5])


def test_group_all_correct_and_none_correct():
    all_right = group_rewards([resp("2", 1.0), resp("2", 0.6)], "2")
    assert [o.confidence_reward for o in all_right] == pytest.approx([0.0, -0.4])
    assert all(o.group_accuracy == 1.0 for o in all_right)
    none_right = group_rewards([resp("3", 1.0), resp("1", 0.0)], "2")
    assert [o.confidence_reward for o in none_right] == pytest.approx([-1.0, 0.0])
    assert [o.total for o in none_right] == pytest.approx([0.0, 1.0])


def test_invalid_confidences_count_as_missing():
    out = group_rewards([resp("2", 1.5), resp("2", "nan"), resp("2", "high"), resp(None, 0.5)], "2")
    assert [o.confidence for o in out] == [None, None, None, 0.5]
    assert [o.confidence_reward for o in out[:3]] == [-1.0, -1.0, -1.0]
    assert out[3].format == 0.5 and out[3].correctness == 0.0


def test_weights_and_language_switch():
    w = RewardWeights(accuracy=2.0, format=0.0, confidence=0.5)
    (o,) = group_rewards([resp("2", 0.5)], "2", weights=w)
    assert o.total == pytest.approx(2.0 * 1 + 0.5 * -0.5)
    switched = "Let me think. 我们需要计算这个问题的答案然后给出结果 \\boxed{2} \\confidence{1.0}"
    (o,) = group_rewards([switched], "2", prompt="What is 1+1?")
    assert o.format == 0.0 and o.correctness == 1.0
    with pytest.raises(Exception):
        RewardWeights(accuracy=-1)


def test_choice_group_and_batch():
    groups = [
        ([resp("B", 0.7), resp("(C)", 0.4)], "B", "choice"),
        ([resp("12", 0.9)], "12", "math"),
    ]
    out = batch_group_rewards(groups, confidence_reward="brier")
    assert [o.correct for o in out[0]] == [True, False]
    assert out[0][0].confidence_reward == pytest.approx(-0.09)
    assert out[0][1].confidence_reward == pytest.approx(-0.16)
    assert out[1][0].correct and out[1][0].group_accuracy == 1.0
