"""The stepwise policy's training and calibration: advantages, plateau, derived inputs, the generation cache,
training on a scripted step environment, the threshold's bootstrap interval."""

import asyncio

import numpy as np
import pytest

from corea.collab.cache import CachedTiers, deterministic
from corea.collab.mixture import StepMixture
from corea.collab.policy import (StepPolicy, derive, leave_one_out_advantages, policy_gradient_step, returns_to_go,
                                 step_features)
from corea.collab.strategies import Settings
from corea.collab.tiers import Output, TierUnavailable
from corea.collab.trace import Call, CostModel, Trace
from corea.data import Record
from corea.evaluate.operating_point import Sweep, choose_index, frontier, held_out_intervals, threshold_interval
from corea.evaluate.policy_training import TrainingConfig, advantages, llm_step_share, plateaued, step_costs, train


def test_returns_to_go_and_leave_one_out_baseline():
    assert returns_to_go(1.0, [0.2, 0.3, 0.5], 0.5) == pytest.approx([0.5, 0.6, 0.75])
    g = [np.array([1.0, 2.0]), np.array([3.0]), np.array([5.0, 6.0, 7.0])]
    finals = [10.0, 20.0, 30.0]
    adv = leave_one_out_advantages(g, finals)
    # step 0: others' mean; step 1: sample 1 has ended, so its final stands in; step 2: both others ended
    assert adv[0] == pytest.approx([1 - (3 + 5) / 2, 2 - (20 + 6) / 2])
    assert adv[1] == pytest.approx([3 - (1 + 5) / 2])
    assert adv[2] == pytest.approx([5 - 2, 6 - (2 + 20) / 2, 7 - (10 + 20) / 2])
    assert leave_one_out_advantages([np.array([0.4])], [0.4])[0] == pytest.approx([0.4])
    assert leave_one_out_advantages([], []) == []
    # equal returns -> no signal; the baseline never uses the sample's own return
    same = leave_one_out_advantages([np.array([0.7])] * 4, [0.7] * 4)
    assert all(a == pytest.approx([0.0]) for a in same)


def test_advantages_batch_and_per_question():
    correct = np.array([1.0, 0.0, 1.0, 1.0])
    costs = [np.array([0.2, 0.1]), np.array([0.3]), np.array([0.1]), np.array([0.1, 0.1])]
    groups = [[0, 1], [2, 3]]
    rewards = [1 - 0.09, -0.09, 1 - 0.03, 1 - 0.06]
    batch = advantages(correct, costs, 0.3, groups, TrainingConfig(lam=0.3))
    assert batch[0] == pytest.approx([rewards[0] - np.mean(rewards)] * 2)
    loo = advantages(correct, costs, 0.3, groups, TrainingConfig(lam=0.3, samples=2, baseline="loo"))
    assert loo[0] == pytest.approx([rewards[0] - rewards[1]] * 2) and loo[1] == pytest.approx([rewards[1] - rewards[0]])
    assert loo[2] == pytest.approx([rewards[2] - rewards[3]])
    to_go = advantages(correct, costs, 0.3, groups, TrainingConfig(lam=0.3, samples=2, baseline="loo", returns="to_go"))
    assert to_go[0] == pytest.approx([(1 - 0.09) - (0 - 0.09), (1 - 0.03) - 0.0])
    with pytest.raises(ValueError):
        TrainingConfig(baseline="loo", samples=1)
    with pytest.raises(ValueError):
        TrainingConfig(returns="sum")


def test_plateau_rule():
    assert not plateaued([0.1, 0.2, 0.3], 2, 0.01)  # fewer than 2 windows
    assert not plateaued([0.1, 0.2, 0.3, 0.4], 2, 0.01)
    assert plateaued([0.1, 0.5, 0.5, 0.5, 0.5, 0.5], 2, 0.01)
    assert not plateaued([0.5] * 6, 2, 0.01, min_iterations=8)
    assert not plateaued([0.5] * 6, 0, 0.01)


def test_derived_inputs_and_their_round_trip():
    mix = StepMixture((0.3, 0.7), (0.45, 0.98), (0.05, 0.001))
    f = step_features([1.0, 0.3, 0.9], 2, 80, True)
    x = derive(f, ("log_min", "posterior"), mix)
    assert x.shape == (10,) and x[8] == pytest.approx(np.log(0.3) / 10) and x[9] == pytest.approx(mix.posterior(0.3))
    assert derive(np.stack([f, f]), ("log_min",)).shape == (2, 9)
    assert derive(step_features([0.0], 0, 1, False), ("log_min",))[8] == pytest.approx(-2.0)  # clipped at log = -20
    with pytest.raises(ValueError):
        derive(f, ("posterior",))
    with pytest.raises(ValueError):
        StepPolicy(derived=("posterior",))
    policy = StepPolicy(seed=3, derived=("log_min", "posterior"), mixture=mix)
    back = StepPolicy.from_json(policy.to_json())
    assert back.derived == policy.derived and back.mixture == mix
    assert back.prob(f) == pytest.approx(policy.prob(f), abs=1e-6)
    import torch

    assert policy.prob(f) == pytest.approx(float(torch.sigmoid(policy.logits(f).detach())), abs=1e-6)
    # the numpy copy of the weights follows an update
    opt = torch.optim.SGD(policy.net.parameters(), lr=1.0)
    before = policy.prob(f)
    policy_gradient_step(policy, opt, [[(f, True)]], [np.array([1.0])])
    assert policy.prob(f) > before
    assert policy.prob(f) == pytest.approx(float(torch.sigmoid(policy.logits(f).detach())), abs=1e-6)


class CountingTiers:
    def __init__(self):
        self.calls = 0

    async def answer(self, tier, messages, params):
        self.calls += 1
        await asyncio.sleep(0.001)
        return Output(f"{tier} {self.calls}", 10, 2)

    async def step(self, tier, messages, prefix, params):
        self.calls += 1
        await asyncio.sleep(0.001)
        if prefix == "down":
            raise TierUnavailable(tier, "down")
        return Output(f"{tier}:{prefix}|{self.calls}", 10, 2)


def test_generation_cache_answers_each_seeded_call_once():
    inner = CountingTiers()
    tiers = CachedTiers(inner)
    msgs = [{"role": "user", "content": "q"}]
    seeded = {"temperature": 0.6, "seed": 1}

    async def many():
        return await asyncio.gather(*(tiers.step("slm", msgs, "p", seeded) for _ in range(5)),
                                    tiers.step("slm", msgs, "other", seeded), tiers.step("llm", msgs, "p", seeded))

    outs = asyncio.run(many())
    assert inner.calls == 3 and len({o.text for o in outs[:5]}) == 1 and tiers.hits == 4 and tiers.misses == 3
    again = asyncio.run(tiers.step("slm", msgs, "p", seeded))  # a later event loop: from the cache
    assert again.text == outs[0].text and inner.calls == 3
    asyncio.run(tiers.step("slm", msgs, "p", {"temperature": 0.6, "seed": 2}))
    assert inner.calls == 4  # other settings, other call
    unseeded = {"temperature": 0.6}
    a, b = asyncio.run(tiers.answer("slm", msgs, unseeded)), asyncio.run(tiers.answer("slm", msgs, unseeded))
    assert a.text != b.text and not deterministic(unseeded) and deterministic({"temperature": 0.0})
    with pytest.raises(TierUnavailable):
        asyncio.run(tiers.step("slm", msgs, "down", seeded))
    with pytest.raises(TierUnavailable):  # failures are not cached
        asyncio.run(tiers.step("slm", msgs, "down", seeded))
    assert len(tiers) == 4


class HardStepTiers:
    """Three steps per question; the question names its hard step ("q3 h1": step 1, "h-1": none). The SLM
    writes a hard step wrong and unsure (p_min 0.3), the others right and sure (0.97); the LLM writes every
    step right. The final box holds 1 when no step is wrong (gold "1")."""

    async def answer(self, tier, messages, params):
        return Output("\\boxed{1}", 50, 12)

    async def step(self, tier, messages, prefix, params):
        hard = int(messages[-1]["content"].split()[1][1:])
        t = prefix.count("\n\n")
        wrong = tier == "slm" and t == hard
        if t == 2:
            ok = "x" not in prefix and not wrong
            return Output(f"\\boxed{{{int(ok)}}}", 50 + t * 4, 4, token_probs=[1.0, 0.3 if wrong else 0.97, 1.0, 1.0])
        return Output(f"{'x' if wrong else 's'}{t}\n\n", 50 + t * 4, 4,
                      token_probs=[1.0, 0.3 if wrong else 0.97, 1.0, 1.0])


def test_training_with_per_question_baseline_learns_to_hand_over_the_unsure_steps():
    records = [Record(id=f"q{i}", question=f"q{i} h{(i % 3) if i % 2 else -1}", gold="1", kind="math")
               for i in range(12)]
    s = Settings(max_steps=3, max_step_tokens=8, aggregate="min")
    model = CostModel(ratio=4.0, slm_params=1.0, llm_params=4.0)
    cfg = TrainingConfig(lam=0.3, iterations=60, samples=4, baseline="loo", returns="to_go", lr=0.05,
                         plateau_window=5, plateau_tol=0.002, min_iterations=20)
    policy, history = train(HardStepTiers(), records, {"max_tokens": 64}, s, model, cfg)
    assert 20 <= len(history) <= 60
    unsure, sure = step_features([1.0, 0.3, 1.0, 1.0], 1, 54, False), step_features([1.0, 0.97, 1.0, 1.0], 1, 54, False)
    assert policy.prob(unsure) > 0.7 and policy.prob(sure) < 0.3
    last = history[-1]
    assert last["pass_at_1"] > history[0]["pass_at_1"] and last["reward"] > history[0]["reward"] + 0.1
    assert last["llm_step_share"] < history[0]["llm_step_share"]
    assert {"iteration", "reward", "pass_at_1", "cost_rel", "llm_step_share", "loss", "seconds"} <= set(last)


def test_step_costs_and_llm_step_share():
    t = Trace("stepwise_policy", 0.5)
    t.add(Call("slm", "step", 50, 6, "a\n\n", step=0), "c0")
    t.add(Call("slm", "draft", 56, 6, "b\n\n", step=1, accepted=False), "c1")
    t.add(Call("llm", "step", 56, 6, "B\n\n", step=1), "c1")
    t.decisions = [(None, False), (None, True)]
    model = CostModel(ratio=4.0)
    assert step_costs(t, model) == pytest.approx([50 + 24, (56 + 24) + 4 * (56 + 24)])
    assert llm_step_share(t) == 0.5


def test_threshold_choice_its_interval_and_held_out_intervals():
    rng = np.random.default_rng(0)
    n = 200
    llm_correct, llm_cost = (rng.random(n) < 0.8).astype(float), np.full(n, 10.0)
    taus = np.array([0.0, 0.5, 1.0])
    correct = np.stack([(rng.random(n) < p).astype(float) for p in (0.5, 0.79, 0.8)])
    cost = np.stack([np.full(n, c) for c in (3.0, 6.0, 12.0)])
    share = np.stack([np.full(n, s) for s in (0.0, 0.3, 1.0)])
    sweep = Sweep(taus, correct, cost, share)
    k = choose_index(sweep, llm_correct, llm_cost, 0.02)
    acc = correct.mean(axis=1)
    ok = [i for i in range(3) if acc[i] >= llm_correct.mean() - 0.02]
    assert k == min(ok, key=lambda i: cost[i, 0])
    iv = threshold_interval(sweep, llm_correct, llm_cost, 0.02, n_boot=200)
    assert iv.value == taus[k] and iv.low <= iv.value <= iv.high and iv.low in taus and iv.high in taus
    held = held_out_intervals(correct[1], cost[1], share[1], llm_correct, llm_cost, n_boot=200)
    assert held["pass_at_1"].value == pytest.approx(acc[1]) and held["cost_rel"].value == pytest.approx(0.6)
    assert held["drop"].value == pytest.approx(llm_correct.mean() - acc[1])
    assert held["drop"].low <= held["drop"].value <= held["drop"].high
    assert held["llm_share"].value == pytest.approx(0.3)
    rows = frontier(sweep, llm_cost)
    assert [r["cost_rel"] for r in rows] == pytest.approx([0.3, 0.6, 1.2]) and rows[2]["llm_share"] == 1.0


def test_generation_cache_makes_inner_tiers_per_event_loop():
    made = []

    def factory():
        made.append(CountingTiers())
        return made[-1]

    tiers = CachedTiers(factory)
    msgs = [{"role": "user", "content": "q"}]
    seeded = {"temperature": 0.6, "seed": 1}
    first = asyncio.run(tiers.step("slm", msgs, "p", seeded))
    assert asyncio.run(tiers.step("slm", msgs, "p", seeded)).text == first.text and len(made) == 1
    asyncio.run(tiers.step("slm", msgs, "q", seeded))
    assert len(made) == 2 and tiers.misses == 2 and tiers.hits == 1


def test_training_is_reproducible():
    records = [Record(id=f"q{i}", question=f"q{i} h{(i % 3) if i % 2 else -1}", gold="1", kind="math")
               for i in range(6)]
    s = Settings(max_steps=3, max_step_tokens=8, aggregate="min")
    cfg = TrainingConfig(lam=0.3, iterations=3, samples=2, baseline="loo", returns="to_go")
    runs = [train(HardStepTiers(), records, {"max_tokens": 64}, s, CostModel(ratio=4.0), cfg)[1] for _ in range(2)]
    assert [(h["reward"], h["llm_step_share"]) for h in runs[0]] == [(h["reward"], h["llm_step_share"]) for h in runs[1]]


def test_plots_are_written(tmp_path):
    from corea.evaluate.frontier_plots import frontiers, learning_curves

    rows = [{"iteration": i, "reward": 0.1 * i, "pass_at_1": 0.5, "cost_rel": 1.0, "llm_step_share": 0.3}
            for i in range(4)]
    assert learning_curves({0.1: rows, 0.3: rows}, tmp_path / "a.png").stat().st_size > 0
    line = [{"cost_rel": c, "pass_at_1": p} for c, p in ((0.5, 0.3), (1.0, 0.6), (2.0, 0.7))]
    out = frontiers({"policy": line, "steer": line}, {"LLM-only": (1.0, 0.7)}, {"policy": (1.0, 0.6)},
                    tmp_path / "b.png", target=(0.7, 0.02))
    assert out.stat().st_size > 0


def test_what_evaluation_writes_configures_serving(tmp_path):
    """`corea eval`'s strategies folder becomes a serve config's strategies section; without a policy, a
    stepwise_policy request's 400 names the command that writes one."""
    import json

    from corea.evaluate.online import serve_settings
    from corea.serve.config import load_serve_config
    from corea.serve.openai_schema import ApiError
    from corea.serve.strategies import StrategyServer
    from support import write_quiet_policy

    write_quiet_policy(tmp_path / "stepwise_policy.json")
    (tmp_path / "steer_mixture.json").write_text(StepMixture((0.3, 0.7), (0.45, 0.98), (0.05, 0.001)).to_json())
    (tmp_path / "strategies.json").write_text(json.dumps(
        {"thresholds": {"cascade": 0.4, "steer": 0.75, "stepwise_policy": 0.25, "cope": 0.5},
         "max_steps": 2, "max_step_tokens": 16, "aggregate": "min", "lookahead": None}))
    section = serve_settings(tmp_path)
    base = {"name": "c", "slm": {"model": "tiny:slm"}, "llm": {"model": "tiny:llm"}}
    cfg = load_serve_config({**base, "strategies": {**section, "model_ids": {"corea-steer": "steer"}}})
    st = cfg.strategies
    assert st.thresholds == {"steer": 0.75, "stepwise_policy": 0.25, "cope": 0.5} and st.max_steps == 2
    server = StrategyServer(None, None, cfg, None)
    assert server.settings("stepwise_policy", None).threshold == 0.25 and server.base.mixture is not None
    bare = StrategyServer(None, None, load_serve_config(base), None)
    with pytest.raises(ApiError) as err:
        bare.settings("stepwise_policy", None)
    assert err.value.status == 400 and "corea eval --config" in str(err.value.message)
