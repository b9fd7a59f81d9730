"""Contract tests: our vLLM-facing code against vLLM 0.29.0's real classes, on CPU.

They run in the environment `.ci/run` builds (vLLM installed without its CUDA dependencies; see README
"vLLM contract tests") with `pytest -m vllm_contract`; elsewhere they skip. What cannot run on CPU: building an
engine (`vllm.LLM`, `AsyncLLM`: no CUDA platform), NCCL (`PyNcclCommunicator`), so the trainer engine's sender.
Where an engine would be, the real `vllm.LLM` methods run on an object whose `llm_engine` pushes each utility
call through vLLM's own encoder, decoder and `_convert_msgspec_args`, as the ZMQ hop to EngineCore does.
"""

from __future__ import annotations

import inspect
import itertools
import threading
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm.v1.serial_utils", reason="vLLM contract tests run in the vLLM environment (.ci/vllm-live)")
pytestmark = pytest.mark.vllm_contract

import vllm  # noqa: E402
from vllm.v1.engine.core import EngineCore, EngineCoreProc  # noqa: E402
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder  # noqa: E402

from corea.engines.base import EngineInputError, SamplingParams  # noqa: E402
from corea.engines.vllm_engine import (  # noqa: E402
    VLLMEngine,
    client_errors,
    engine_args,
    to_generation,
    vllm_sampling_params,
)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class UtilityHop:
    """Stands in for the engine-core client of a GPU engine: every call crosses vLLM's utility serialization."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.version = "default"
        self._ids = itertools.count()

    def _hop(self, method: str, *args):
        frames = MsgpackEncoder().encode((0, next(self._ids), method, args))
        _, _, name, decoded = MsgpackDecoder().decode(frames)
        target = getattr(EngineCore, name)
        return EngineCoreProc._convert_msgspec_args(target, decoded)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        received = self._hop("collective_rpc", method, timeout, args, kwargs)
        _, _, got_args, got_kwargs = received
        assert _same(list(got_args), list(args)), f"{method}: args arrive as {got_args!r}"
        assert _same(got_kwargs, kwargs), f"{method}: kwargs arrive as {got_kwargs!r}"
        self.calls.append((method, tuple(got_args), dict(got_kwargs or {})))
        return [None]

    def set_weight_version(self, weight_version):
        (self.version,) = self._hop("set_weight_version", weight_version)

    def get_weight_version(self):
        return self.version

    def reset_prefix_cache(self, *args):
        self._hop("reset_prefix_cache", *args)
        return True


@pytest.fixture()
def engine(tiny_checkpoints):
    """A ``VLLMEngine`` whose ``llm`` is a real ``vllm.LLM`` without a GPU engine behind it."""
    llm = object.__new__(vllm.LLM)
    llm.llm_engine = UtilityHop()
    eng = object.__new__(VLLMEngine)
    eng.model_path, eng.lock, eng.async_engine, eng.llm = str(tiny_checkpoints["slm"]), threading.RLock(), False, llm
    eng._expected = None
    return eng


def test_weight_payloads_survive_the_utility_call_serialization(engine, tiny_checkpoints):
    """Defect 1: tensors in collective_rpc arguments arrive as (dtype, shape, index) lists; we send none."""
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["slm_b"]).state_dict()
    engine.update_weights(state)
    (method, args, kwargs), = engine.llm.llm_engine.calls
    assert method == "reload_weights" and args == ()
    assert set(kwargs) == {"weights_path", "is_checkpoint_format"}
    sig = inspect.signature(__import__("vllm.v1.worker.gpu_model_runner", fromlist=["x"]).GPUModelRunner.reload_weights)
    sig.bind(None, **kwargs)  # the worker forwards these to GPUModelRunner.reload_weights


def test_weight_transfer_round_through_the_llm_api(engine, tiny_checkpoints):
    """init / start / update / finish as vLLM's NCCL trainer engine drives them through our client."""
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

    init = asdict(NCCLWeightTransferInitInfo(master_address="10.0.0.1", master_port=29555, rank_offset=1,
                                             world_size=5, packed=True))
    engine.init_weight_transfer({**init, "rank_offset": 3})
    engine.start_weight_update()
    names, shapes = ["model.embed_tokens.weight", "lm_head.weight"], [[64, 32], [64, 32]]
    update = asdict(NCCLWeightTransferUpdateInfo(names=names, dtype_names=["bfloat16", "bfloat16"], shapes=shapes))
    engine.receive_weights(update)
    engine.finish_weight_update(7)
    calls = engine.llm.llm_engine.calls
    assert [c[0] for c in calls] == ["init_weight_transfer_engine", "start_weight_update", "update_weights",
                                     "finish_weight_update"]
    # what the worker's engine parses the decoded payloads into
    assert NCCLWeightTransferInitInfo(**calls[0][2]["init_info"]).rank_offset == 3
    assert NCCLWeightTransferUpdateInfo(**calls[2][2]["update_info"]).shapes == shapes
    assert engine.weight_version() == "7"


def test_worker_and_engine_api_signatures():
    """The weight-transfer API we call, with the parameters we pass (vLLM 0.29.0)."""
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.worker.gpu_worker import Worker

    for cls in (vllm.LLM, AsyncLLM):
        inspect.signature(cls.init_weight_transfer_engine).bind(None, {"init_info": {}})
        inspect.signature(cls.start_weight_update).bind(None)
        inspect.signature(cls.update_weights).bind(None, {"update_info": {}})
        inspect.signature(cls.finish_weight_update).bind(None, weight_version="3")
        inspect.signature(cls.update_weight_version).bind(None, "3")
        inspect.signature(cls.get_weight_version).bind(None)
        inspect.signature(cls.reset_prefix_cache).bind(None)
        inspect.signature(cls.collective_rpc).bind(None, "reload_weights", kwargs={})
    assert inspect.iscoroutinefunction(AsyncLLM.finish_weight_update)
    for name, args in [("init_weight_transfer_engine", ({},)), ("start_weight_update", ()),
                       ("update_weights", ({},)), ("finish_weight_update", ()), ("reload_weights", ())]:
        inspect.signature(getattr(Worker, name)).bind(None, *args)
    assert not hasattr(Worker, "corea_load_weights")  # no worker extension of ours remains
    inspect.signature(WeightTransferTrainerFactory.trainer_init).bind(
        NCCLTrainerInitInfo(master_address="h", master_port=1, world_size=2, rank=0), client=None, source=None)
    assert {"master_address", "master_port", "world_size", "rank", "packed"} <= set(
        inspect.signature(NCCLTrainerInitInfo).parameters)
    assert hasattr(NCCLTrainerWeightTransferEngine, "send_weights")


def test_weight_transfer_config_and_engine_args(tiny_checkpoints):
    from vllm.config import WeightTransferConfig
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    assert WeightTransferConfig(backend="nccl").backend == "nccl"
    assert "nccl" in WeightTransferEngineFactory._registry and "nccl" in WeightTransferTrainerFactory._registry
    args = engine_args(str(tiny_checkpoints["slm"]), tensor_parallel_size=4, dtype="bfloat16", enforce_eager=True,
                       max_model_len=2048, cpu=False)
    for cls in (EngineArgs, AsyncEngineArgs):
        built = cls(**args)
        assert isinstance(built.weight_transfer_config, WeightTransferConfig)
        assert built.weight_transfer_config.backend == "nccl"
        assert built.distributed_executor_backend == "mp" and built.tensor_parallel_size == 4
        assert built.gpu_memory_utilization == 0.85 and built.kv_cache_memory_bytes is None
    # vLLM's CPU build: a KV-cache byte budget (never a share of the machine's memory), eager, no transfer backend
    cpu = EngineArgs(**engine_args(str(tiny_checkpoints["slm"]), kv_cache_bytes=2**27, cpu=True))
    assert cpu.kv_cache_memory_bytes == 2**27 and cpu.enforce_eager and cpu.weight_transfer_config is None
    assert "gpu_memory_utilization" not in engine_args(str(tiny_checkpoints["slm"]), cpu=True)
    with pytest.raises(ValueError, match="needs GPUs"):
        engine_args(str(tiny_checkpoints["slm"]), tensor_parallel_size=2, cpu=True)


def _completion(i: int, finished: bool = True):
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput

    tokens = [3 + i, 9]
    return CompletionOutput(index=i, text=f"sample {i}", token_ids=tokens, cumulative_logprob=-1.0,
                            logprobs=[{t: Logprob(logprob=-0.5 * (k + 1))} for k, t in enumerate(tokens)],
                            finish_reason="stop" if finished else None)


def _children_outputs(params, n: int) -> list[list]:
    """What vLLM's ParentRequest hands on as each of n children finishes."""
    from vllm.v1.engine.parallel_sampling import ParentRequest

    parent = ParentRequest(SimpleNamespace(request_id="r", external_req_id="r", params=params))
    ids = [parent.get_child_info(i)[0] for i in range(n)]
    return [parent.get_outputs(child, _completion(i))[0] for i, child in enumerate(ids)]


def test_sampling_params_and_outputs_n_samples():
    """Defect 5: our async requests ask for FINAL_ONLY, under which vLLM gathers all n children in one output."""
    from vllm.outputs import RequestOutput
    from vllm.sampling_params import RequestOutputKind

    ours = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=16, min_tokens=4, seed=5, stop=("##",),
                          stop_token_ids=(2,))
    params = vllm_sampling_params(ours)
    assert isinstance(params, vllm.SamplingParams) and params.output_kind == RequestOutputKind.FINAL_ONLY
    assert (params.n, params.temperature, params.top_p, params.max_tokens, params.min_tokens, params.seed,
            params.stop, params.stop_token_ids, params.logprobs) == (3, 0.7, 0.9, 16, 4, 5, ["##"], [2], 0)
    assert vllm_sampling_params(ours, final_only=False).output_kind == RequestOutputKind.CUMULATIVE

    final = _children_outputs(params, 3)
    assert [len(o) for o in final] == [0, 0, 3]  # nothing until the last child, then all three
    streamed = _children_outputs(vllm_sampling_params(ours, final_only=False), 3)
    assert [len(o) for o in streamed] == [1, 1, 1]  # CUMULATIVE: one child per output (the old bug)

    output = RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1, 2, 3], prompt_logprobs=None,
                           outputs=list(reversed(final[-1])), finished=True)
    gen = to_generation(output, [1, 2, 3])
    assert [s.text for s in gen.samples] == ["sample 0", "sample 1", "sample 2"]
    assert gen.samples[1].token_ids == [4, 9] and gen.samples[1].logprobs == [-0.5, -1.0]
    assert all(s.finish_reason == "stop" for s in gen.samples) and gen.prompt_token_ids == [1, 2, 3]


def test_generate_and_continue_send_vllm_sampling_params(tiny_checkpoints):
    """Both offline entry points hand ``vllm.LLM.generate`` token-id prompts and a real ``vllm.SamplingParams``,
    and read its ``RequestOutput`` back; an over-long continuation is refused before it reaches vLLM."""
    from vllm.outputs import CompletionOutput, RequestOutput

    from corea.models.loading import load_tokenizer

    calls = []

    def generate(inputs, params, use_tqdm=True):
        assert isinstance(params, vllm.SamplingParams) and not use_tqdm
        calls.append((inputs, params))
        return [RequestOutput(request_id=str(i), prompt=None, prompt_token_ids=x["prompt_token_ids"],
                              prompt_logprobs=None, finished=True,
                              outputs=[CompletionOutput(index=0, text="ok", token_ids=[5], cumulative_logprob=-0.1,
                                                        logprobs=None, finish_reason="length")])
                for i, x in enumerate(inputs)]

    eng = object.__new__(VLLMEngine)
    eng.tokenizer, eng.lock, eng.async_engine = load_tokenizer(tiny_checkpoints["slm"]), threading.RLock(), False
    eng.llm, eng.max_model_len = SimpleNamespace(generate=generate), 64
    params = SamplingParams(max_tokens=4)
    first = eng.generate(["What is 1 + 1?"], params)
    cont = eng.continue_prompts([("What is 1 + 1?", "Step 1:")], params)
    assert [g.samples[0].text for g in first + cont] == ["ok", "ok"]
    assert len(calls[1][0][0]["prompt_token_ids"]) > len(calls[0][0][0]["prompt_token_ids"])
    with pytest.raises(EngineInputError):
        eng.continue_prompts([("What is 1 + 1?", "word " * 200)], params)
    assert len(calls) == 2


def test_validation_errors_become_engine_input_errors():
    """Defect 7: vLLM's client-side validation error (not a ValueError) is raised as a client error."""
    from vllm.exceptions import VLLMValidationError

    assert not issubclass(VLLMValidationError, ValueError)
    with pytest.raises(EngineInputError, match="too long"):
        with client_errors():
            raise VLLMValidationError("prompt too long", parameter="prompt")


def test_tp_rollout_engine_on_the_mp_backend():
    """Defect 2: the 32B config's TP 4 engine gets the mp backend; vLLM's ParallelConfig accepts it and does not
    switch to the Ray executor (whose bundle check refuses a 4-GPU bundle)."""
    from vllm.config import ParallelConfig

    from corea.train.config import load_config
    from corea.train.placement import rollout_engine_options, training_bundles

    cfg = load_config("configs/paper-qwen2.5-32b-rlcc-l1.yaml")
    options = rollout_engine_options(cfg)
    parallel = ParallelConfig(tensor_parallel_size=options["tensor_parallel_size"],
                              distributed_executor_backend=options["distributed_executor_backend"])
    assert parallel.world_size == 4 and parallel.distributed_executor_backend == "mp" and not parallel.use_ray
    assert training_bundles(cfg)[0]["GPU"] == parallel.world_size  # one bundle holds the TP group


def test_trainer_engine_non_sender_exhausts_the_source_once_per_round(tiny_checkpoints):
    """Every policy rank runs vLLM's trainer engine; a non-sender rank only iterates the source, once per round,
    and the source's metadata matches iteration (vLLM checks this on the sender)."""
    from transformers import AutoModelForCausalLM
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    from corea.train.weight_sync import RolloutClient, full_param_source

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["slm"])
    passes = []

    def named_full_params():  # stands in for Policy.named_full_params (gathered under ZeRO-3 there)
        passes.append(0)
        for name, p in model.named_parameters():
            passes[-1] += 1
            yield name, p.detach()

    source = full_param_source(named_full_params)
    meta = source.metadata()
    assert [m.name for m in meta] == [n for n, _ in model.named_parameters()]
    assert [m.shape for m in meta] == [tuple(p.shape) for p in model.parameters()]
    info = NCCLTrainerInitInfo(master_address="127.0.0.1", master_port=1, world_size=3, rank=1)
    client = RolloutClient([], tensor_parallel_size=1)
    from vllm.distributed.weight_transfer.base import VLLMWeightSyncClient

    assert isinstance(client, VLLMWeightSyncClient)
    transfer = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
    assert not transfer.is_sender
    transfer.send_weights()
    transfer.send_weights()
    n = len(list(model.parameters()))
    assert passes == [n, n, n]  # metadata pass at set-up, then one full pass per round


def test_ray_data_llm_processor_config():
    from ray.data.llm import vLLMEngineProcessorConfig

    from corea.evaluate.generate import GenerationJob, vllm_processor_config

    job = GenerationJob(role="llm", model_path="/models/llm", backend="vllm", concurrency=2, batch_size=16,
                        options={"tensor_parallel_size": 2, "dtype": "bfloat16"})
    config = vllm_processor_config(job)
    assert isinstance(config, vLLMEngineProcessorConfig)
    assert config.model_source == "/models/llm" and config.engine_kwargs["tensor_parallel_size"] == 2
    assert config.concurrency == 2 and config.batch_size == 16
