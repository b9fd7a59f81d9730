"""The generation engines: sampling, seeding, token accounting, log-probabilities, stops, weights, streaming."""

import asyncio
import threading

import pytest
import torch

from corea.engines import Engine, Generation, SamplingParams, load_engine
from corea.engines.hf import HFEngine, sample_tokens
from corea.protocol import chat_messages

PROMPTS = [chat_messages("What is 2 + 3?"), chat_messages("Name a prime number."), "The answer is \\boxed{"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    return load_engine(str(tiny_checkpoints["slm"]), backend="transformers", device="cpu")


def greedy(max_tokens=24, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def forward_logprobs(model, prompt_ids, token_ids):
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    return logp[len(prompt_ids) - 1 : -1].gather(1, torch.tensor(token_ids)[:, None])[:, 0]


def collect(engine, prompt, params):
    async def run():
        return [delta async for delta in engine.stream(prompt, params)]

    return asyncio.run(run())


def test_engine_interface(engine):
    assert isinstance(engine, Engine) and isinstance(engine, HFEngine)
    assert engine.model_path.endswith("slm")
    assert engine.tokenizer.padding_side == "left"
    assert engine.generate([], SamplingParams()) == []
    with pytest.raises(ValueError):
        load_engine(engine.model_path, backend="tensorrt")


def test_n_distinct_samples_at_temperature_one(engine):
    gens = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_tokens=32, seed=0))
    assert len(gens) == len(PROMPTS) and all(isinstance(g, Generation) for g in gens)
    for gen in gens:
        assert len(gen.samples) == 4
        assert len({tuple(s.token_ids) for s in gen.samples}) == 4


def test_same_seed_same_samples_whatever_the_batch(engine, tiny_checkpoints):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=20, seed=1234)
    first = engine.generate(PROMPTS, params)
    again = engine.generate(PROMPTS, params)
    alone = engine.generate(PROMPTS[1:2], params)
    small_batches = HFEngine(tiny_checkpoints["slm"], max_batch_size=2).generate(PROMPTS, params)
    ids = lambda gens: [[s.token_ids for s in g.samples] for g in gens]  # noqa: E731
    assert ids(first) == ids(again) == ids(small_batches)
    assert ids(alone)[0] == ids(first)[1]
    other = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_tokens=20, seed=1235))
    assert ids(other) != ids(first)
    unseeded = [engine.generate(PROMPTS[:1], SamplingParams(max_tokens=20))[0].samples[0].token_ids for _ in "ab"]
    assert unseeded[0] != unseeded[1]


def test_token_counts(engine):
    params = SamplingParams(n=2, max_tokens=16, seed=0)
    gens = engine.generate(PROMPTS, params)
    for prompt, gen in zip(PROMPTS, gens):
        if isinstance(prompt, str):
            expected = engine.tokenizer(prompt)["input_ids"]
        else:
            text = engine.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            expected = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert gen.prompt_token_ids == expected and gen.prompt_tokens == len(expected)
        for sample in gen.samples:
            assert sample.output_tokens == len(sample.token_ids) == len(sample.logprobs) <= 16
            assert sample.finish_reason in ("stop", "length")
            if sample.finish_reason == "length":
                assert sample.output_tokens == 16
            assert 0 < sample.mean_token_prob <= 1


@pytest.mark.parametrize("params", [SamplingParams(n=2, temperature=1.0, max_tokens=40, seed=7),
                                    SamplingParams(n=2, temperature=0.6, top_p=0.9, max_tokens=40, seed=7),
                                    greedy(40)])
def test_logprobs_match_a_separate_forward_pass(engine, params):
    """Log-probs are those of the unmodified model (temperature 1, no top-p), whatever the sampling settings."""
    for gen in engine.generate(PROMPTS, params):
        for sample in gen.samples:
            ref = forward_logprobs(engine.model, gen.prompt_token_ids, sample.token_ids)
            assert torch.allclose(ref, torch.tensor(sample.logprobs), atol=1e-4, rtol=0)


def test_greedy_is_deterministic_and_batch_independent(engine):
    batched = engine.generate(PROMPTS, greedy(n=3))
    for prompt, gen in zip(PROMPTS, batched):
        assert len({tuple(s.token_ids) for s in gen.samples}) == 1
        alone = engine.generate([prompt], greedy())[0].samples[0]
        assert alone.token_ids == gen.samples[0].token_ids and alone.text == gen.samples[0].text
        # greedy picks the most likely token at every step
        ref = forward_logprobs(engine.model, gen.prompt_token_ids, alone.token_ids)
        assert torch.allclose(ref, torch.tensor(alone.logprobs), atol=1e-4)


def test_tiny_top_p_is_greedy(engine):
    sampled = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=24, seed=3))
    assert [g.samples[0].token_ids for g in sampled] == [g.samples[0].token_ids for g in engine.generate(PROMPTS, greedy())]


def test_sample_tokens_follows_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0]]).repeat(20000, 1)
    drawn = sample_tokens(logits, 1.0, 1.0, torch.rand(20000).clamp_(min=1e-12))
    freq = torch.bincount(drawn, minlength=4).float() / 20000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.015)
    nucleus = sample_tokens(logits, 1.0, 0.5, torch.rand(20000).clamp_(min=1e-12))
    assert set(nucleus.tolist()) == {2}  # p(2) = 0.67 alone reaches top_p = 0.5


def test_stop_strings_truncate(engine):
    full = engine.generate(PROMPTS, greedy(48))
    for prompt, gen in zip(PROMPTS, full):
        text, ids = gen.samples[0].text, gen.samples[0].token_ids
        k = next(i for i in range(8, len(text) - 2) if "\ufffd" not in text[i : i + 2])
        stop = text[k : k + 2]
        cut = engine.generate([prompt], greedy(48, stop=("never-there", stop)))[0].samples[0]
        assert cut.finish_reason == "stop"
        assert cut.text == text[: text.find(stop)]
        assert cut.token_ids == ids[: len(cut.token_ids)] and len(cut.token_ids) < len(ids)
        assert stop in engine.tokenizer.decode(cut.token_ids)
        assert stop not in engine.tokenizer.decode(cut.token_ids[:-1])
        assert len(cut.logprobs) == len(cut.token_ids)


def test_stop_token_ids_end_the_sample(engine):
    full = engine.generate(PROMPTS[:1], greedy(32))[0].samples[0]
    stop_id = full.token_ids[5]
    cut = engine.generate(PROMPTS[:1], greedy(32, stop_token_ids=(stop_id,)))[0].samples[0]
    first = full.token_ids.index(stop_id)
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[: first + 1]


def only_eos_engine(path) -> tuple[HFEngine, int]:
    """(engine, EOS id): a model whose residual stream is one constant vector, with an output head that only
    scores EOS."""
    engine = HFEngine(path)
    sd = engine.model.state_dict()
    e = torch.randn(sd["model.embed_tokens.weight"].shape[1])
    eos = engine.tokenizer.eos_token_id
    update = {"model.embed_tokens.weight": e.expand_as(sd["model.embed_tokens.weight"]).clone()}
    update.update({k: torch.zeros_like(v) for k, v in sd.items() if k.endswith(("o_proj.weight", "down_proj.weight"))})
    head = torch.zeros_like(sd["lm_head.weight"])
    head[eos] = e
    engine.update_weights({**update, "lm_head.weight": head})
    return engine, eos


def test_eos_ends_the_sample_and_is_kept_in_token_ids(tiny_checkpoints):
    engine, eos = only_eos_engine(tiny_checkpoints["slm"])
    for params in (greedy(8), SamplingParams(n=3, max_tokens=8, seed=0)):
        for sample in engine.generate(PROMPTS, params)[0].samples:
            assert sample.token_ids == [eos] and sample.finish_reason == "stop" and sample.text == ""
            assert len(sample.logprobs) == 1 and sample.logprobs[0] > -1e-3


def test_min_tokens_holds_back_eos_stop_ids_and_stop_strings(tiny_checkpoints, engine):
    """vLLM's ``min_tokens``: the EOS-only model of the test above must write 5 tokens, none of them EOS, then
    EOS; a stop token id or stop string met before ``min_tokens`` does not end the sample."""
    only_eos, eos = only_eos_engine(tiny_checkpoints["slm"])
    for params in (greedy(8, min_tokens=5), SamplingParams(n=2, max_tokens=8, min_tokens=5, seed=0)):
        for sample in only_eos.generate(PROMPTS[:1], params)[0].samples:
            assert len(sample.token_ids) == 6 and eos not in sample.token_ids[:5] and sample.token_ids[5] == eos
            assert sample.finish_reason == "stop" and len(sample.logprobs) == 6
            assert all(lp < -1.0 for lp in sample.logprobs[:5])  # the model's own (raw) log-probabilities

    full = engine.generate(PROMPTS[:1], greedy(32))[0].samples[0]
    stop_id = full.token_ids[2]
    first = full.token_ids.index(stop_id)
    late = engine.generate(PROMPTS[:1], greedy(32, stop_token_ids=(stop_id,), min_tokens=first + 1))[0].samples[0]
    assert late.token_ids[:first] == full.token_ids[:first] and stop_id not in late.token_ids[: first + 1]
    assert len(late.token_ids) > first + 1
    stop = engine.tokenizer.decode(full.token_ids[2:4])
    n = len(full.token_ids) - (full.finish_reason == "stop")  # EOS is masked too: compare the tokens before it
    if stop.strip() and "\ufffd" not in stop:
        kept = engine.generate(PROMPTS[:1], greedy(32, stop=(stop,), min_tokens=n))[0].samples[0]
        assert kept.token_ids[:n] == full.token_ids[:n] and len(kept.token_ids) >= n


def test_max_tokens_gives_length(engine):
    sample = engine.generate(PROMPTS[:1], greedy(3))[0].samples[0]
    assert sample.finish_reason == "length" and sample.output_tokens == 3


def test_chat_messages_and_their_rendered_string_agree(engine):
    messages = chat_messages("What is 7 * 6?")
    rendered = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    as_chat, as_text = engine.generate([messages, rendered], greedy())
    assert as_chat.prompt_token_ids == as_text.prompt_token_ids
    assert as_chat.samples[0].token_ids == as_text.samples[0].token_ids
    assert engine.render(messages) == rendered and engine.render("raw text") == "raw text"


def test_update_weights_matches_the_updated_model(tiny_checkpoints):
    a = HFEngine(tiny_checkpoints["slm"])
    b = HFEngine(tiny_checkpoints["slm_b"])
    params = SamplingParams(n=2, max_tokens=24, seed=5)
    before = a.generate(PROMPTS, greedy())
    target = b.generate(PROMPTS, greedy())
    assert [g.samples[0].token_ids for g in before] != [g.samples[0].token_ids for g in target]
    a.update_weights(b.model.state_dict())
    for x, y in zip(a.generate(PROMPTS, greedy()) + a.generate(PROMPTS, params),
                    target + b.generate(PROMPTS, params)):
        assert [s.token_ids for s in x.samples] == [s.token_ids for s in y.samples]
        assert [s.logprobs for s in x.samples] == [s.logprobs for s in y.samples]


def test_update_weights_subset_and_errors(tiny_checkpoints):
    engine = HFEngine(tiny_checkpoints["slm"])
    name = "model.layers.0.mlp.down_proj.weight"
    original = engine.model.state_dict()[name].clone()
    new = torch.randn_like(original, dtype=torch.bfloat16)
    engine.update_weights({name: new})  # a subset, another dtype
    assert torch.equal(engine.model.state_dict()[name], new.float())
    with pytest.raises(ValueError, match="unknown"):
        engine.update_weights({name: original, "model.layers.9.nope.weight": original})
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights({name: original, "lm_head.weight": torch.zeros(3, 3)})
    assert torch.equal(engine.model.state_dict()[name], new.float())  # a rejected update changes nothing
    assert set(engine.state_dict()) == set(engine.model.state_dict())


@pytest.mark.parametrize("stop", [(), ("zz", "e ")])
def test_stream_concatenates_to_the_generated_text(engine, stop):
    for prompt in PROMPTS:
        params = greedy(40, stop=stop)
        deltas = collect(engine, prompt, params)
        text = engine.generate([prompt], params)[0].samples[0].text
        assert "".join(deltas) == text
        assert len(deltas) > 1 or len(text) < 2
    seeded = SamplingParams(max_tokens=30, seed=11)
    assert "".join(collect(engine, PROMPTS[0], seeded)) == engine.generate(PROMPTS[:1], seeded)[0].samples[0].text


def test_stream_can_be_abandoned(engine):
    async def first_delta():
        stream = engine.stream(PROMPTS[0], SamplingParams(max_tokens=2000, seed=0))
        async for delta in stream:
            await stream.aclose()
            return delta

    assert asyncio.run(first_delta())
    assert engine.generate(PROMPTS[:1], greedy(4))[0].samples[0].output_tokens == 4  # the lock was released


def test_concurrent_callers_get_sequential_results(engine):
    params = SamplingParams(n=2, max_tokens=16, seed=9)
    expected = [g.samples[0].token_ids for g in engine.generate(PROMPTS, params)]
    results = {}

    def call(i):
        results[i] = engine.generate([PROMPTS[i % len(PROMPTS)]], params)[0].samples[0].token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(6)] == expected * 2


def test_llm_size_generates(tiny_checkpoints):
    gen = load_engine(str(tiny_checkpoints["llm"])).generate(PROMPTS[:1], SamplingParams(n=2, max_tokens=8, seed=0))
    assert [s.output_tokens for s in gen[0].samples] == [8, 8]


@pytest.mark.parametrize(
    "kwargs",
    [dict(n=0), dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
     dict(max_tokens=0), dict(stop=("",)), dict(min_tokens=-1), dict(max_tokens=4, min_tokens=5)],
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompts", ["a lone string", [[{"role": "user"}]], [123], [[]], [""]])
def test_bad_prompts(engine, prompts):
    with pytest.raises(ValueError):
        engine.generate(prompts, greedy())


def test_bad_engine_options_and_lengths(engine, tiny_checkpoints):
    with pytest.raises(ValueError):
        HFEngine(tiny_checkpoints["slm"], max_batch_size=0)
    with pytest.raises(ValueError):
        HFEngine(tiny_checkpoints["slm"], dtype="float8")
    with pytest.raises(ValueError):
        engine.generate(PROMPTS[:1], SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(ValueError):
        collect(engine, PROMPTS[0], SamplingParams(n=2))
