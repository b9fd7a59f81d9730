import numpy as np
import pytest

from corea import cost


def test_token_cost():
    assert cost.token_cost(10, 5) == pytest.approx(30)
    assert cost.token_cost(7, 0, size_ratio=32 / 7) == pytest.approx(32)
    assert np.allclose(cost.token_cost([1, 2], [1, 1]), [5, 6])


def test_thresholds_cover_range():
    taus = cost.thresholds(0.1)
    assert taus[0] == 0.0 and taus[-1] == pytest.approx(1.1) and len(taus) == 12


def test_cascade_hand_computed():
    conf = [0.9, 0.4, None, 0.7]
    slm_correct = [1, 0, 0, 1]
    llm_correct = [1, 1, 1, 0]
    slm_cost = [10, 10, 10, 10]
    llm_cost = [50, 50, 50, 50]
    p = cost.cascade_point(conf, slm_correct, slm_cost, llm_correct, llm_cost, tau=0.5)
    # defer: 0.4 and None -> queries 2 and 3 go to the LLM
    assert p.llm_pct == 50.0
    assert p.pass_at_1 == pytest.approx((1 + 1 + 1 + 1) / 4)
    assert p.slm_cost == 10 and p.llm_cost == 25 and p.avg_cost == 35
    assert p.relative_cost == pytest.approx(35 / 50)
    zero = cost.cascade_point(conf, slm_correct, slm_cost, llm_correct, llm_cost, tau=0.0)
    assert zero.llm_pct == 25.0  # only the missing confidence defers
    everything = cost.cascade_point(conf, slm_correct, slm_cost, llm_correct, llm_cost, tau=1.1)
    assert everything.llm_pct == 100.0 and everything.pass_at_1 == 0.75 and everything.avg_cost == 60


def test_router_hand_computed():
    prob = [0.9, 0.2]
    p = cost.router_point(prob, [3, 3], [1, 0], [10, 10], [1, 1], [50, 50], tau=0.5)
    # query 1 -> SLM (3 + 10), query 2 -> LLM (3 + 50)
    assert p.slm_cost == pytest.approx((13 + 3) / 2) and p.llm_cost == 25
    assert p.avg_cost == pytest.approx(33) and p.pass_at_1 == 1.0 and p.llm_pct == 50


def test_sweep_monotone_llm_share():
    rng = np.random.default_rng(0)
    conf = rng.random(50)
    pts = cost.cascade_sweep(conf, rng.random(50) < 0.5, np.full(50, 5.0), np.ones(50), np.full(50, 20.0))
    shares = [p.llm_pct for p in pts]
    assert shares == sorted(shares) and shares[-1] == 100.0
    costs = [p.avg_cost for p in pts]
    assert costs == sorted(costs)


def test_length_mismatch():
    with pytest.raises(ValueError):
        cost.cascade_point([0.5], [1, 0], [1], [1], [1], 0.5)
