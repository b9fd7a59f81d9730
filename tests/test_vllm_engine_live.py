"""The vLLM backend against the live engine: vLLM 0.29.0's CPU build, the tiny checkpoints.

Runs in the vLLM environment (`.ci/vllm-live`). One engine is alive at a time (class-scoped fixtures): the offline
engine on the tiny SLM, then the async (serving) engine on the tiny LLM. Log-probabilities are compared with a plain
transformers forward pass of the same checkpoint.
"""

import asyncio
import time

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from corea.engines import SamplingParams, load_engine  # noqa: E402
from corea.engines.base import EngineInputError, encode_continuation  # noqa: E402
from corea.engines.hf import HFEngine  # noqa: E402
from corea.models import make_tiny_checkpoint  # noqa: E402
from corea.protocol import chat_messages  # noqa: E402

OPTIONS = dict(dtype="float32", max_model_len=512)
PROMPTS = [chat_messages("What is 2 + 3?"), chat_messages("Name a prime number."), "The answer is \\boxed{"]
TOLERANCE = 1e-4


def forward_logprobs(model, prompt_ids, token_ids) -> torch.Tensor:
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    return logp[len(prompt_ids) - 1: -1].gather(1, torch.tensor(token_ids)[:, None])[:, 0]


def max_gap(model, generations) -> float:
    gaps = [0.0]
    for gen in generations:
        for s in gen.samples:
            ref = forward_logprobs(model, gen.prompt_token_ids, s.token_ids)
            gaps.append(float((ref - torch.tensor(s.logprobs)).abs().max()))
    return max(gaps)


def check_n_samples_match_transformers(engine, path):
    params = SamplingParams(n=4, temperature=1.0, max_tokens=48, seed=7)
    gens, again = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    hf = HFEngine(str(path))
    for prompt, gen, gen2 in zip(PROMPTS, gens, again):
        assert gen.prompt_token_ids == hf.encode(prompt)
        assert len(gen.samples) == 4 and len({tuple(s.token_ids) for s in gen.samples}) == 4
        assert [s.token_ids for s in gen.samples] == [s.token_ids for s in gen2.samples]  # seeded
        assert all(len(s.token_ids) == len(s.logprobs) >= 1 for s in gen.samples)
    assert max_gap(hf.model, gens) < TOLERANCE


@pytest.fixture(scope="class")
def offline_engine(tiny_checkpoints):
    engine = load_engine(str(tiny_checkpoints["slm"]), "vllm", **OPTIONS)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="class")
def async_engine(tiny_checkpoints):
    engine = load_engine(str(tiny_checkpoints["llm"]), "vllm", async_engine=True, **OPTIONS)
    yield engine
    engine.shutdown()


@pytest.fixture
def engine(request):
    """The engine of the test's class (class-scoped, so one engine is alive at a time)."""
    return request.getfixturevalue(request.cls.ENGINE)


class TestOfflineEngine:
    """``vllm.LLM`` on the tiny SLM (head_dim 32)."""

    ENGINE = "offline_engine"

    def test_n_samples_and_logprobs_match_transformers(self, engine, tiny_checkpoints):
        check_n_samples_match_transformers(engine, tiny_checkpoints["slm"])

    def test_continue_prompts_stop_strings_and_min_tokens(self, engine, tiny_checkpoints):
        hf = HFEngine(str(tiny_checkpoints["slm"]))
        item = (chat_messages("What is 2 + 3?"), "Let me think. 2 + 3")
        gen = engine.continue_prompts([item], SamplingParams(temperature=0.0, max_tokens=32))[0]
        assert gen.prompt_token_ids == encode_continuation(hf.tokenizer, *item)
        assert max_gap(hf.model, [gen]) < TOLERANCE

        free = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=48))[0].samples[0]
        stop = free.text[6:9]
        assert stop and free.text.find(stop) >= 1
        cut = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=48, stop=(stop,)))[0].samples[0]
        assert cut.text == free.text[: free.text.find(stop)] and cut.finish_reason == "stop"
        held = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=48, stop=(stop,),
                                                           min_tokens=40))[0].samples[0]
        assert held.output_tokens >= 40  # the stop string is not checked before min_tokens

    def test_context_length_errors_are_client_errors(self, engine):
        with pytest.raises(EngineInputError):
            engine.generate(["word " * 600], SamplingParams(max_tokens=8))
        # vLLM's rule is the prompt's alone: a max_tokens past the context ends the sample at the context's end
        gen = engine.generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_tokens=600, min_tokens=600, seed=0))[0]
        assert gen.prompt_tokens + gen.samples[0].output_tokens == OPTIONS["max_model_len"]

    def test_folder_reload_twice_a_partial_update_then_back(self, engine, tiny_checkpoints):
        greedy = SamplingParams(temperature=0.0, max_tokens=24)
        base, other = HFEngine(str(tiny_checkpoints["slm"])), HFEngine(str(tiny_checkpoints["slm_b"]))
        before = engine.generate(PROMPTS, greedy)

        engine.reload_weights(str(tiny_checkpoints["slm_b"]), version=1)
        got = engine.generate(PROMPTS, greedy)
        assert [g.samples[0].token_ids for g in got] == [g.samples[0].token_ids for g in other.generate(PROMPTS, greedy)]
        assert max_gap(other.model, got) < TOLERANCE and engine.weight_version() == "1"

        engine.reload_weights(str(tiny_checkpoints["slm"]), version=2)
        again = engine.generate(PROMPTS, greedy)
        assert [g.samples[0].token_ids for g in again] == [g.samples[0].token_ids for g in before]
        assert engine.weight_version() == "2"

        head = {"lm_head.weight": other.model.state_dict()["lm_head.weight"]}
        engine.update_weights(head)  # a partial update: the other model's output head only
        mixed = HFEngine(str(tiny_checkpoints["slm"]))
        mixed.update_weights(head)
        got = engine.generate(PROMPTS, greedy)
        assert max_gap(mixed.model, got) < TOLERANCE and engine.weight_version() == "2"

        engine.reload_weights()  # no folder: the last complete folder (the base checkpoint)
        assert max_gap(base.model, engine.generate(PROMPTS, greedy)) < TOLERANCE
        with pytest.raises(ValueError):
            engine.update_weights({"nope": torch.zeros(1)})


class TestAsyncEngine:
    """``AsyncLLM`` (the serving engine) on the tiny LLM."""

    ENGINE = "async_engine"

    def test_n_samples_and_logprobs_match_transformers(self, engine, tiny_checkpoints):
        check_n_samples_match_transformers(engine, tiny_checkpoints["llm"])

    def test_stream_deltas_make_the_sample(self, engine):
        async def collect(params):
            return [d async for d in engine.stream(PROMPTS[0], params)]

        greedy = SamplingParams(temperature=0.0, max_tokens=40)
        whole = engine.generate(PROMPTS[:1], greedy)[0].samples[0].text
        deltas = asyncio.run(collect(greedy))
        assert len(deltas) > 1 and "".join(deltas) == whole
        stop = whole[5:8]
        cut = asyncio.run(collect(SamplingParams(temperature=0.0, max_tokens=40, stop=(stop,))))
        assert "".join(cut) == whole[: whole.find(stop)]

    def test_cancelled_requests_are_aborted_inside_vllm(self, engine):
        long = SamplingParams(temperature=1.0, max_tokens=480, min_tokens=480, seed=0)
        easy = SamplingParams(temperature=0.0, max_tokens=8)

        async def drained(deadline_s=2.0) -> float:
            start = time.perf_counter()
            while engine.num_unfinished_requests() and time.perf_counter() - start < deadline_s:
                await asyncio.sleep(0.02)
            assert engine.num_unfinished_requests() == 0, "vLLM still holds the cancelled request"
            return time.perf_counter() - start

        async def timed_easy() -> float:
            start = time.perf_counter()
            await engine.agenerate(PROMPTS[:1], easy)
            return time.perf_counter() - start

        async def scenario():
            usual = min([await timed_easy() for _ in range(3)])
            task = asyncio.create_task(engine.agenerate(PROMPTS[:1], long))  # a non-streaming request
            await asyncio.sleep(0.5)
            assert engine.num_unfinished_requests() == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await drained()
            after = await timed_easy()

            stream = engine.stream(PROMPTS[0], long)  # a streaming request, left after a few deltas
            for _ in range(3):
                await stream.__anext__()
            assert engine.num_unfinished_requests() == 1
            await stream.aclose()
            await drained()
            return usual, after

        usual, after = asyncio.run(scenario())
        assert after < max(1.0, 5 * usual), f"easy request took {after:.2f} s after the abort (usual {usual:.2f} s)"

    def test_weight_transfer_calls_reach_the_workers(self, engine):
        # vLLM's CPU build has no weight-transfer backend; the request must still cross to the workers in vLLM's
        # own request type (AsyncLLM reads request.init_info), where the worker refuses it.
        with pytest.raises(Exception, match="Weight transfer not configured"):
            engine.init_weight_transfer({"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                                         "world_size": 2})
        with pytest.raises(Exception, match="Weight transfer not configured"):
            engine.receive_weights({"names": [], "dtype_names": [], "shapes": []})

    def test_async_reload_and_health(self, engine, tiny_checkpoints, tmp_path):
        other = make_tiny_checkpoint(tmp_path / "llm-b", "llm", seed=1)
        engine.reload_weights(str(other), version=3)
        got = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16))
        assert max_gap(HFEngine(str(other)).model, got) < TOLERANCE and engine.weight_version() == "3"
        engine.check_health()
