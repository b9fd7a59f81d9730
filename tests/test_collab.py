"""The collaboration layer's pure parts: step splitter, rules, mixture, trace costs, policy, threshold choice."""

import asyncio

import numpy as np
import pytest

from corea.collab.mixture import StepMixture
from corea.collab.policy import StepPolicy, calibrate_threshold, reinforce_step, step_features
from corea.collab.rules import defers, defers_many, step_confidence
from corea.collab.steps import is_final, split_steps
from corea.collab.strategies import Settings, cascade, cope, steer, stepwise_policy
from corea.collab.tiers import Output, TierUnavailable
from corea.collab.trace import CostModel
from corea.cost import cached_token_cost, defers as cost_defers, flops, token_cost


def test_split_steps_round_trips_and_ends_at_blank_lines():
    text = "3 + 4 = 7\n\n7 * 2 = 14\n\n\n14 - 5 = 9\n\n\\boxed{9} \\confidence{0.9}"
    steps = split_steps(text)
    assert "".join(steps) == text
    assert steps == ["3 + 4 = 7\n\n", "7 * 2 = 14\n\n\n", "14 - 5 = 9\n\n", "\\boxed{9} \\confidence{0.9}"]
    assert [is_final(s) for s in steps] == [False, False, False, True]
    assert split_steps("") == [] and split_steps("one line") == ["one line"]
    assert is_final("\\boxed{3}\n\n")  # the final box ends the answer even before a blank line


def test_cascade_rule_is_shared_with_the_cost_model():
    conf = [0.9, 0.4, None, float("nan"), 0.5]
    assert list(defers_many(conf, 0.5)) == [False, True, True, True, False]
    assert list(cost_defers(conf, 0.5)) == list(defers_many(conf, 0.5))
    assert [defers(c, 0.5) for c in conf] == [False, True, True, True, False]
    assert defers(1.0, 1.1)  # tau = 1.1 defers everything


def test_step_confidence_aggregates():
    p = [0.9, 0.2, 0.8, 0.5]
    assert step_confidence(p, "first") == 0.9
    assert step_confidence(p, "min") == 0.2
    assert step_confidence(p, "mean") == pytest.approx(0.6)
    assert step_confidence(p, "gmean") == pytest.approx(np.exp(np.log(p).mean()))
    assert step_confidence(p, "min", lookahead=1) == 0.9
    assert step_confidence([], "min") == 0.0
    with pytest.raises(ValueError):
        step_confidence(p, "max")


def test_mixture_posterior_matches_scikit_learn():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.95, 0.03, 200), rng.normal(0.3, 0.1, 80)]).clip(0, 1)
    mix = StepMixture.fit(x, seed=0)
    ref = GaussianMixture(2, covariance_type="full", random_state=0, reg_covar=1e-4).fit(x.reshape(-1, 1))
    grid = np.linspace(0, 1, 21)
    expected = ref.predict_proba(grid.reshape(-1, 1))[:, int(np.argmax(ref.means_[:, 0]))]
    np.testing.assert_allclose(mix.posterior(grid), expected, atol=1e-6)
    assert mix.posterior(0.97) > 0.9 > 0.1 > mix.posterior(0.3)
    assert StepMixture.from_json(mix.to_json()) == mix
    with pytest.raises(ValueError):
        StepMixture.fit([0.5])


def test_cost_functions():
    assert float(cached_token_cost(100, 10, 0, 2.0)) == float(token_cost(100, 10, 2.0)) == 280.0
    assert float(cached_token_cost(100, 10, 60, 1.0)) == pytest.approx(40 + 6 + 40)
    assert float(flops(100, 10, 1e9, 60)) == 2e9 * 50
    with pytest.raises(ValueError):
        cached_token_cost(10, 1, 11)


class ScriptedTiers:
    """Tiers answering from scripts: steps per tier in order, answers per tier in order."""

    def __init__(self, steps=None, answers=None, down=()):
        self.steps = {t: list(v) for t, v in (steps or {}).items()}
        self.answers = {t: list(v) for t, v in (answers or {}).items()}
        self.down, self.prefixes = set(down), []

    async def answer(self, tier, messages, params):
        if tier in self.down:
            raise TierUnavailable(tier, "down")
        return self.answers[tier].pop(0)

    async def step(self, tier, messages, prefix, params):
        if tier in self.down:
            raise TierUnavailable(tier, "down")
        self.prefixes.append((tier, prefix))
        assert params["stop"][-1] == "\n\n" and params["include_stop_str_in_output"]
        return self.steps[tier].pop(0)


def _steer_tiers(down=()):
    return ScriptedTiers(steps={
        "slm": [Output("1 + 2 = 3\n\n", 50, 6, token_probs=[1.0] * 6),
                Output("3 * 4 = 11\n\n", 56, 6, token_probs=[1.0, 0.9, 0.2, 1.0, 1.0, 1.0]),
                Output("\\boxed{12} \\confidence{1.0}", 62, 8, token_probs=[1.0] * 8)],
        "llm": [Output("3 * 4 = 12\n\n", 56, 6, token_probs=[1.0] * 6)]}, down=down)


def test_steer_hands_one_step_to_the_llm_and_costs_the_trace():
    tiers = _steer_tiers()
    s = Settings(threshold=0.5, mixture=None, aggregate="min")
    trace = asyncio.run(steer(tiers, [{"role": "user", "content": "q"}], {"max_tokens": 64}, s))
    assert trace.text == "1 + 2 = 3\n\n3 * 4 = 12\n\n\\boxed{12} \\confidence{1.0}"
    assert [(c.tier, c.role, c.accepted) for c in trace.calls] == [
        ("slm", "step", True), ("slm", "draft", False), ("llm", "step", True), ("slm", "step", True)]
    assert ("llm", "1 + 2 = 3\n\n") in tiers.prefixes  # the LLM continues the same prefix
    # prefix cache: the SLM's 2nd call extends its 1st (50 + 6 tokens), its 3rd extends its 2nd's prompt (56)
    assert [c.cached_tokens for c in trace.calls] == [0, 56, 0, 56]
    model = CostModel(ratio=4.0, slm_params=1.0, llm_params=4.0)
    costs = trace.costs(model)
    assert costs["cost"] == pytest.approx((50 + 24) + (56 + 24) + 4 * (56 + 24) + (62 + 32))
    assert costs["cost_cached"] == pytest.approx(74 + (5.6 + 24) + 4 * 80 + (6 + 5.6 + 32))
    assert costs["flops"] == pytest.approx(2 * (56 + 6) + 2 * 4 * 62 + 2 * (6 + 8))
    assert trace.llm_steps == 1 and trace.llm_share() == pytest.approx(1 / 3)
    assert [d[1] for d in trace.decisions] == [False, True, False]


def test_llm_outage_mid_trace_raises_or_degrades():
    s = Settings(threshold=0.5)
    with pytest.raises(TierUnavailable):
        asyncio.run(steer(_steer_tiers(down={"llm"}), [{"role": "user", "content": "q"}], {}, s))
    s.degrade_to_slm = True
    trace = asyncio.run(steer(_steer_tiers(down={"llm"}), [{"role": "user", "content": "q"}], {}, s))
    assert trace.degraded and "3 * 4 = 11" in trace.text and all(c.tier == "slm" for c in trace.calls)


def test_cascade_and_cope_follow_their_rules():
    msgs = [{"role": "user", "content": "q"}]
    low, high = Output("\\boxed{1} \\confidence{0.2}", 40, 9), Output("\\boxed{2} \\confidence{0.9}", 40, 9)
    t = asyncio.run(cascade(ScriptedTiers(answers={"slm": [low], "llm": [high]}), msgs, {}, Settings(threshold=0.5)))
    assert t.text == high.text and [c.accepted for c in t.calls] == [False, True]
    plan = Output("Plan: add.", 30, 4)
    t = asyncio.run(cope(ScriptedTiers(answers={"slm": [plan, low, low], "llm": [plan, high]}), msgs, {},
                         Settings(threshold=0.5)))
    assert [(c.tier, c.role) for c in t.calls] == [("slm", "plan"), ("slm", "execute"), ("llm", "plan"),
                                                    ("slm", "execute"), ("llm", "execute")]
    assert t.text == high.text and [c.accepted for c in t.calls] == [False, False, True, False, True]
    t = asyncio.run(cope(ScriptedTiers(answers={"slm": [plan, high]}), msgs, {}, Settings(threshold=0.5)))
    assert len(t.calls) == 2 and t.text == high.text


def test_policy_reinforce_learns_to_call_the_llm_on_low_confidence_steps():
    import torch

    policy = StepPolicy(seed=0)
    opt = torch.optim.Adam(policy.net.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    for _ in range(200):
        episodes = []
        for _ in range(32):
            hard = rng.random() < 0.5
            f = step_features([1.0, 0.2 if hard else 1.0], 1, 60, False)
            a = bool(rng.random() < policy.prob(f))
            correct = a if hard else True  # a hard step is right only when the LLM writes it
            episodes.append(([(f, a)], float(correct) - 0.3 * float(a)))
        reinforce_step(policy, opt, episodes)
    assert policy.prob(step_features([1.0, 0.2], 1, 60, False)) > 0.8
    assert policy.prob(step_features([1.0, 1.0], 1, 60, False)) < 0.2
    assert StepPolicy.from_json(policy.to_json()).prob(step_features([1.0], 0, 1, True)) == pytest.approx(
        policy.prob(step_features([1.0], 0, 1, True)), abs=1e-6)


def test_stepwise_policy_requires_a_policy():
    with pytest.raises(ValueError):
        asyncio.run(stepwise_policy(_steer_tiers(), [], {}, Settings()))


def test_threshold_calibration_targets():
    taus = [0.0, 0.25, 0.5, 0.75, 1.1]
    acc = [0.6, 0.7, 0.9, 0.95, 0.96]
    cost = [0.2, 0.3, 0.5, 0.8, 1.2]
    assert calibrate_threshold(taus, acc, cost, 0.96, max_drop=0.02) == 0.75
    assert calibrate_threshold(taus, acc, cost, 0.96, max_drop=0.1) == 0.5
    assert calibrate_threshold(taus, acc, cost, 0.96, budget=0.6) == 0.5
    assert calibrate_threshold(taus, acc, cost, 0.96, budget=0.1) is None
    with pytest.raises(ValueError):
        calibrate_threshold(taus, acc, cost, 0.96)


def test_engine_continues_an_assistant_prefix_and_keeps_the_stop_string(tmp_path):
    from corea.engines import SamplingParams, load_engine
    from corea.models import make_tiny_checkpoint

    engine = load_engine(str(make_tiny_checkpoint(tmp_path / "slm", "slm")), device="cpu")
    msgs = [{"role": "user", "content": "What is 1 + 2?"}]
    prefix = "1 + 2 = 3\n\n"
    gen = engine.continue_prompts([(msgs, prefix)], SamplingParams(temperature=0, max_tokens=12))[0]
    assert gen.prompt_token_ids == engine.encode(msgs) + engine.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    text = gen.samples[0].text
    stop = text[3:5]  # a stop string the greedy continuation is known to reach
    assert len(stop) == 2 and stop.strip()
    cut = engine.continue_prompts([(msgs, prefix)], SamplingParams(temperature=0, max_tokens=12, stop=(stop,)))[0]
    kept = engine.continue_prompts([(msgs, prefix)], SamplingParams(temperature=0, max_tokens=12, stop=(stop,),
                                                                     include_stop_str_in_output=True))[0]
    at = text.find(stop)
    assert cut.samples[0].text == text[:at] and kept.samples[0].text == text[: at + len(stop)]
    assert kept.samples[0].token_ids == cut.samples[0].token_ids
