import math

import pytest
import torch

from corea.train import grpo


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = grpo.group_advantages(r, group_size=4)
    # group 1: mean 0.5, population std 0.5 -> +-1 (up to eps)
    assert torch.allclose(a[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    # group 2: all equal -> zero advantage
    assert torch.equal(a[4:], torch.zeros(4))
    with pytest.raises(ValueError):
        grpo.group_advantages(torch.ones(5), 4)


def test_group_advantages_three():
    a = grpo.group_advantages(torch.tensor([3.0, 0.0, 0.0]), 3)
    std = math.sqrt(((3 - 1) ** 2 + 1 + 1) / 3)
    assert torch.allclose(a, torch.tensor([2 / std, -1 / std, -1 / std]), atol=1e-5)


def test_k3_kl_hand_computed():
    logp = torch.tensor([math.log(0.5), math.log(0.25)])
    ref = torch.tensor([math.log(0.25), math.log(0.25)])
    kl = grpo.k3_kl(logp, ref)
    d = math.log(0.5)  # ref - logp for the first token
    assert kl[0].item() == pytest.approx(math.exp(d) - d - 1)
    assert kl[1].item() == pytest.approx(0.0)
    assert (grpo.k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_entropy_and_token_logprobs():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]]))
    ent = grpo.entropy_from_logits(logits)
    assert ent[0, 0].item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    assert ent[0, 1].item() == pytest.approx(math.log(3))
    lp = grpo.token_logprobs(logits, torch.tensor([[0, 2]]))
    assert lp[0, 0].item() == pytest.approx(math.log(0.5)) and lp[0, 1].item() == pytest.approx(math.log(1 / 3))


def test_clipped_loss_hand_computed():
    # two sequences of two tokens; the second token of sequence 2 is padding
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))  # ratios 1.5, 1.0 | 0.5, (pad)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    terms = grpo.grpo_loss(logp, old, None, adv, mask, clip_eps=0.2)
    # token losses: -min(1.5, 1.2)*1 = -1.2 ; -1*1 = -1 ; -min(0.5*-2, 0.8*-2) = 1.6
    assert terms.policy_loss.item() == pytest.approx((-1.2 - 1.0 + 1.6) / 3)
    assert terms.clip_fraction.item() == pytest.approx(2 / 3)
    assert terms.loss.item() == pytest.approx(terms.policy_loss.item())
    assert terms.ratio_mean.item() == pytest.approx((1.5 + 1.0 + 0.5) / 3)


def test_loss_with_kl_and_entropy_and_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    ent = torch.tensor([[1.0, 3.0]])
    terms = grpo.grpo_loss(logp, logp.detach(), ref, torch.tensor([1.0]), torch.ones(1, 2), ent, kl_coef=0.1, entropy_coef=0.01)
    kl0 = 0.5 - math.log(0.5) - 1
    assert terms.kl.item() == pytest.approx(kl0 / 2)
    assert terms.entropy.item() == pytest.approx(2.0)
    assert terms.loss.item() == pytest.approx(-1.0 + 0.1 * kl0 / 2 - 0.01 * 2.0)
    terms.loss.backward()
    # d/dlogp of -rho*A at rho=1 is -A/2 per token; plus the KL gradient 0.1*(1 - exp(d))/2
    assert logp.grad[0, 0].item() == pytest.approx(-0.5 + 0.1 * (1 - 0.5) / 2)
    assert logp.grad[0, 1].item() == pytest.approx(-0.5)


def test_advantages_without_std_normalization():
    r = torch.tensor([3.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    a = grpo.group_advantages(r, 3, std_normalize=False)
    assert torch.allclose(a, torch.tensor([2.0, -1.0, -1.0, 0.0, 0.0, 0.0]))
    assert grpo.zero_std_groups(r.tolist(), 3) == [False, True]
    with pytest.raises(ValueError):
        grpo.zero_std_groups([1.0, 2.0], 3)


# two sequences: lengths 3 and 1 (mask), per-token values chosen so every aggregation differs
_VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "how,expected",
    [
        ("token_mean", (1 + 2 + 3 + 4) / 4),  # 2.5
        ("seq_mean_token_mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),  # 3.0
        ("seq_mean_token_sum_norm", ((1 + 2 + 3) / 8 + 4 / 8) / 2),  # N = 8: 0.625
    ],
)
def test_aggregations_hand_computed(how, expected):
    assert grpo.aggregate(_VALUES, _MASK, how, norm_tokens=8).item() == pytest.approx(expected)


def test_aggregation_errors():
    with pytest.raises(ValueError, match="norm_tokens"):
        grpo.aggregate(_VALUES, _MASK, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="one of"):
        grpo.aggregate(_VALUES, _MASK, "sum")


def test_loss_agg_applies_to_policy_kl_and_entropy():
    # rho = 1 everywhere: token policy loss is -A; sequence 1 (3 tokens) A = 1, sequence 2 (1 token) A = -2
    logp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    ref = torch.full((2, 3), math.log(0.5))
    ent = _VALUES
    kl_tok = 0.5 - math.log(0.5) - 1  # k3 with d = log 0.5
    t = grpo.grpo_loss(logp, logp, ref, adv, _MASK, ent, kl_coef=0.1, entropy_coef=0.01, loss_agg="seq_mean_token_mean")
    assert t.policy_loss.item() == pytest.approx((-1 + 2) / 2)
    assert t.kl.item() == pytest.approx(kl_tok)
    assert t.entropy.item() == pytest.approx(3.0)
    t = grpo.grpo_loss(logp, logp, ref, adv, _MASK, ent, loss_agg="seq_mean_token_sum_norm", norm_tokens=4)
    assert t.policy_loss.item() == pytest.approx((-3 / 4 + 2 / 4) / 2)
    assert t.kl.item() == pytest.approx((3 * kl_tok / 4 + kl_tok / 4) / 2)
    t = grpo.grpo_loss(logp, logp, ref, adv, _MASK, ent)  # token mean: (-1 -1 -1 +2) / 4
    assert t.policy_loss.item() == pytest.approx(-0.25)


def test_truncated_importance_weight_hand_computed():
    # one sequence of two tokens; trainer old log-probs 0, rollout sampled with log-probs log 0.5 and log 4
    logp = torch.log(torch.tensor([[1.1, 1.0]])).requires_grad_()
    old = torch.zeros(1, 2)
    behaviour = torch.log(torch.tensor([[0.5, 4.0]]))  # weights exp(0 - b) = 2 -> capped 1.5, and 0.25
    t = grpo.grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 2), behaviour_logp=behaviour, importance_cap=1.5)
    assert t.policy_loss.item() == pytest.approx((-1.5 * 1.1 - 0.25 * 1.0) / 2)
    assert t.importance_weight_mean.item() == pytest.approx((1.5 + 0.25) / 2)
    t.loss.backward()  # the weight is detached: d/dlogp = -w * rho / 2
    assert logp.grad[0, 0].item() == pytest.approx(-1.5 * 1.1 / 2)
    with pytest.raises(ValueError, match="behaviour"):
        grpo.grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 2), importance_cap=2.0)
