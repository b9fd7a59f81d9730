"""The vLLM backend (GPU), written for vLLM 0.29.0. vLLM is imported inside functions only, so this module imports
anywhere.

Two modes:

- offline (default): a ``vllm.LLM``; ``generate`` batches every prompt through ``LLM.generate``. ``stream``
  generates the whole sample and yields it as one delta.
- ``async_engine=True`` (serving): a vLLM ``AsyncLLM`` running on the engine's own event loop thread; ``stream``
  yields token-level deltas (``CUMULATIVE`` outputs) and ``generate`` submits every request concurrently with
  ``RequestOutputKind.FINAL_ONLY``, the only kind under which ``AsyncLLM`` gathers all n children of a request
  into one output (``vllm/v1/engine/parallel_sampling.py``).

Prompts are tokenized here with the checkpoint's tokenizer and chat template (the same code as the transformers
backend) and passed as token ids, so both backends see identical inputs. A prompt that leaves no room in the context
(``len(prompt) >= max_model_len``, vLLM's own rule) and every ``vllm.exceptions.VLLMValidationError`` are raised
as ``EngineInputError`` (a client error). Log-probabilities are vLLM's default ``raw_logprobs``: the unmodified
model distribution (temperature 1, no top-p), as in the transformers backend.

Weights change only through vLLM's own interfaces, never with tensors in ``collective_rpc`` arguments (vLLM's
utility-call encoder turns a tensor into an aux-buffer reference that arrives as a list):

- the weight-transfer API (engine built with ``weight_transfer_config=WeightTransferConfig(backend="nccl")``):
  ``init_weight_transfer`` / ``start_weight_update`` / ``receive_weights`` / ``finish_weight_update`` wrap
  ``init_weight_transfer_engine``, ``start_weight_update``, ``update_weights`` and ``finish_weight_update`` of
  ``LLM`` / ``AsyncLLM``; the trainer side is vLLM's ``NCCLTrainerWeightTransferEngine``
  (``corea.train.weight_sync``). vLLM's worker engine does the receive: packed buffers, layerwise reload around
  ``load_weights``, device synchronize;
- ``reload_weights(folder)``: the workers' own ``reload_weights(weights_path=...)`` reads the safetensors of a
  Hugging Face folder (only a path crosses the RPC). ``update_weights(state_dict)`` writes the tensors to a
  temporary folder and reloads from it.

The weight version is vLLM's (``get_weight_version``; "default" before the first update, which we read as 0).

Placement: a tensor-parallel engine (TP > 1) runs on vLLM's ``mp`` executor backend inside the one bundle that
holds its TP GPUs (see ``engine_args``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import tempfile
import threading
from contextlib import contextmanager
from typing import Any, AsyncIterator, Mapping, Sequence

from corea.engines.base import (
    EngineInputError,
    Generation,
    Prompt,
    Sample,
    SamplingParams,
    check_prompts,
    encode_prompt,
)

log = logging.getLogger(__name__)
WEIGHT_TRANSFER_BACKEND = "nccl"


def engine_args(
    model_path: str,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.85,
    seed: int = 0,
    enable_prefix_caching: bool = True,
    weight_transfer: str | None = WEIGHT_TRANSFER_BACKEND,
    **options: Any,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` / ``AsyncEngineArgs`` (vLLM 0.29.0 names).

    Executor backend: with TP > 1 we ask for ``mp`` unless the caller chose one. Inside a Ray placement group
    vLLM's default is ``ray`` (``ParallelConfig.__post_init__``), and its Ray executor rejects any bundle with
    more than one GPU (``vllm/v1/executor/ray_utils.py``: "Placement group bundle cannot have more than 1 GPU");
    the alternative is one-GPU bundles per TP worker plus ``VLLM_RAY_BUNDLE_INDICES``. We choose ``mp`` because a
    single bundle of TP GPUs keeps the TP group on one node by construction (NVLink), the engine's worker
    processes live and die with the rollout actor (a restart brings the whole engine back), and the bundle layout
    stays one bundle per rollout worker, independent of vLLM's bundle-index bookkeeping. ``mp`` needs the actor
    to see TP GPUs (``device_count() >= world_size``), which the bundle gives it.
    """
    args = dict(
        model=str(model_path),
        tensor_parallel_size=int(tensor_parallel_size),
        dtype=dtype,
        gpu_memory_utilization=float(gpu_memory_utilization),
        seed=seed,
        enable_prefix_caching=enable_prefix_caching,
        **options,
    )
    if int(tensor_parallel_size) > 1:
        args.setdefault("distributed_executor_backend", "mp")
    if weight_transfer:
        args["weight_transfer_config"] = {"backend": weight_transfer}  # EngineArgs builds WeightTransferConfig
    return args


def vllm_sampling_params(params: SamplingParams, final_only: bool = True):
    """Our ``SamplingParams`` as vLLM's; ``final_only`` selects ``RequestOutputKind.FINAL_ONLY`` (all n samples
    in one final output), else ``CUMULATIVE`` (streaming)."""
    import vllm
    from vllm.sampling_params import RequestOutputKind

    return vllm.SamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        seed=params.seed,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        include_stop_str_in_output=params.include_stop_str_in_output,
        logprobs=0,  # the sampled token's log-probability only
        output_kind=RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.CUMULATIVE,
    )


def to_generation(output: Any, prompt_token_ids: list[int]) -> Generation:
    """Map a vLLM ``RequestOutput`` to a ``Generation``."""
    samples = []
    for completion in sorted(output.outputs, key=lambda c: c.index):
        token_ids = list(completion.token_ids)
        logprobs = [float(lp[t].logprob) for t, lp in zip(token_ids, completion.logprobs or [])]
        samples.append(
            Sample(
                text=completion.text,
                token_ids=token_ids,
                logprobs=logprobs,
                finish_reason=completion.finish_reason or "length",
            )
        )
    return Generation(prompt_token_ids=list(output.prompt_token_ids or prompt_token_ids), samples=samples)


def check_context(prompt_tokens: int, max_model_len: int) -> None:
    """vLLM's rule (``InputProcessor``): a prompt needs at least one free position for an output token."""
    if prompt_tokens >= max_model_len:
        raise EngineInputError(
            f"the prompt has {prompt_tokens} tokens; the model's context holds {max_model_len} "
            "(prompt + at least one output token)"
        )


@contextmanager
def client_errors():
    """vLLM's client-side validation errors (not ``ValueError`` subclasses) as ``EngineInputError``."""
    from vllm.exceptions import VLLMValidationError

    try:
        yield
    except VLLMValidationError as exc:
        raise EngineInputError(str(exc)) from exc


def version_number(weight_version: str | None) -> int:
    """vLLM's weight version string as our integer version ("default": the initial weights, 0)."""
    if weight_version in (None, "", "default"):
        return 0
    return int(weight_version)


class VLLMEngine:
    """Generation with vLLM.

    Options (vLLM engine arguments): ``tensor_parallel_size``, ``dtype``, ``gpu_memory_utilization``,
    ``max_model_len``, ``load_format`` ("dummy" for benchmarks without weights), ``seed``,
    ``enable_prefix_caching``, ``enforce_eager``; any other keyword goes to ``vllm.LLM`` / ``AsyncEngineArgs``.
    ``async_engine=True`` selects the streaming engine; ``weight_transfer`` the weight-transfer backend (None: off).
    """

    def __init__(self, model_path: str, async_engine: bool = False, **options: Any) -> None:
        from corea.models.loading import load_tokenizer

        self.model_path = str(model_path)
        self.tokenizer = load_tokenizer(model_path)
        self.lock = threading.RLock()
        self.async_engine = bool(async_engine)
        self._ids = itertools.count()
        args = engine_args(self.model_path, **options)
        if self.async_engine:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="corea-vllm-loop", daemon=True)
            self._thread.start()
            self.llm = self._call(self._make_async(args))
            model_config = self.llm.model_config
        else:
            import vllm

            self.llm = vllm.LLM(**args)
            model_config = self.llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)

    @staticmethod
    async def _make_async(args: dict[str, Any]):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    def _call(self, coro):
        """Run a coroutine on the engine's loop and wait for it (async mode)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _api(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a method of ``LLM`` or ``AsyncLLM`` (awaited on the engine loop) under the engine lock."""
        with self.lock:
            result = getattr(self.llm, method)(*args, **kwargs)
            return self._call(result) if self.async_engine else result

    def encode(self, prompt: Prompt) -> list[int]:
        try:
            ids = encode_prompt(self.tokenizer, prompt)
        except ValueError as exc:
            raise EngineInputError(str(exc)) from exc
        check_context(len(ids), self.max_model_len)
        return ids

    # ---------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None) -> list[Generation]:
        """n samples per prompt, in prompt order."""
        params = params or SamplingParams()
        encoded = [self.encode(p) for p in check_prompts(prompts)]
        if not encoded:
            return []
        with client_errors():
            if self.async_engine:
                return self._call(self._agenerate_all(encoded, params))
            inputs = [{"prompt_token_ids": ids} for ids in encoded]
            with self.lock:
                outputs = self.llm.generate(inputs, vllm_sampling_params(params), use_tqdm=False)
        return [to_generation(o, ids) for o, ids in zip(outputs, encoded)]

    def continue_prompts(self, items, params: SamplingParams | None = None) -> list[Generation]:
        """n samples per ``(prompt, assistant prefix)``, continuing the assistant message (see HFEngine)."""
        from corea.engines.base import encode_continuation

        params = params or SamplingParams()
        encoded = [encode_continuation(self.tokenizer, p, prefix) for p, prefix in items]
        for ids in encoded:
            check_context(len(ids), self.max_model_len)
        if not encoded:
            return []
        with client_errors():
            if self.async_engine:
                return self._call(self._agenerate_all(encoded, params))
            with self.lock:
                outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded],
                                            vllm_sampling_params(params), use_tqdm=False)
        return [to_generation(o, ids) for o, ids in zip(outputs, encoded)]

    async def _agenerate(self, ids: list[int], params: SamplingParams) -> Generation:
        final = None
        request_id = f"corea-{next(self._ids)}"
        async for output in self.llm.generate({"prompt_token_ids": ids}, vllm_sampling_params(params), request_id):
            final = output  # FINAL_ONLY: one output holding all n samples
        return to_generation(final, ids)

    async def _agenerate_all(self, encoded: list[list[int]], params: SamplingParams) -> list[Generation]:
        return list(await asyncio.gather(*(self._agenerate(ids, params) for ids in encoded)))

    # ---------------------------------------------------------------- streaming
    async def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> AsyncIterator[str]:
        """Text deltas of one sample; they concatenate to the sample's ``text`` (stop strings held back)."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream draws one sample; n must be 1, got {params.n}")
        ids = self.encode(prompt)
        if not self.async_engine:
            gen = await asyncio.to_thread(self.generate, [prompt], params)
            if gen[0].samples[0].text:
                yield gen[0].samples[0].text
            return
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        holdback = max((len(s) for s in params.stop), default=1) - 1

        async def pump() -> None:
            emitted = ""
            try:
                request_id = f"corea-{next(self._ids)}"
                sampling = vllm_sampling_params(params, final_only=False)
                with client_errors():
                    async for out in self.llm.generate({"prompt_token_ids": ids}, sampling, request_id):
                        text = out.outputs[0].text  # CUMULATIVE
                        if not out.finished:
                            text = text.rstrip("\ufffd")
                            text = text[: len(text) - holdback]
                        if text.startswith(emitted) and len(text) > len(emitted):
                            caller.call_soon_threadsafe(queue.put_nowait, text[len(emitted) :])
                            emitted = text
                caller.call_soon_threadsafe(queue.put_nowait, done)
            except BaseException as exc:  # handed to the consumer
                caller.call_soon_threadsafe(queue.put_nowait, exc)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                item = await queue.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()  # cancelling the request's iterator aborts it in vLLM

    # ---------------------------------------------------------------- weights
    def init_weight_transfer(self, init_info: Mapping[str, Any]) -> None:
        """Join the trainer's transfer group (blocks until the trainer opens its endpoint)."""
        self._api("init_weight_transfer_engine", {"init_info": dict(init_info)})

    def start_weight_update(self) -> None:
        self._api("start_weight_update")

    def receive_weights(self, update_info: Mapping[str, Any]) -> None:
        """Receive one update round (runs while the trainer broadcasts; vLLM loads layer by layer)."""
        self._api("update_weights", {"update_info": dict(update_info)})

    def finish_weight_update(self, version: int) -> None:
        """Finalize the received weights, commit ``version`` as vLLM's weight version, drop the prefix cache (it
        holds KV computed with the old weights)."""
        self._api("finish_weight_update", weight_version=str(int(version)))
        self._api("reset_prefix_cache")
        log.info("vLLM weights now at version %s", self.weight_version())

    def reload_weights(self, folder: str, version: int) -> None:
        """Load the safetensors of the Hugging Face folder ``folder`` on every worker (vLLM's ``reload_weights``,
        layerwise), then commit ``version``. ``folder`` must be readable from the engine's node."""
        self._api("collective_rpc", "reload_weights", kwargs=reload_kwargs(folder))
        self._api("update_weight_version", str(int(version)))
        self._api("reset_prefix_cache")
        log.info("vLLM weights reloaded from %s, version %s", folder, self.weight_version())

    def weight_version(self) -> str:
        return str(self._api("get_weight_version"))

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes of the checkpoint's architecture (built on the meta device)."""
        if getattr(self, "_expected", None) is None:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(self.model_path)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            self._expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return self._expected

    def update_weights(self, state_dict: Mapping[str, Any]) -> None:
        """Load new parameters (Hugging Face names, all or a subset) through ``reload_weights``: the tensors are
        written as safetensors to a temporary folder on this node, only its path crosses the RPC. The weight
        version is left as it was."""
        from safetensors.torch import save_file

        import torch

        tensors = {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in state_dict.items()}
        expected = self._expected_shapes()
        unknown = sorted(set(tensors) - set(expected))
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ValueError(f"{len(unknown)} unknown parameter name(s) for {self.model_path}: {shown}")
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {expected[name]}")
        folder = tempfile.mkdtemp(prefix="corea-vllm-weights-")
        try:
            save_file(tensors, f"{folder}/model.safetensors")
            self._api("collective_rpc", "reload_weights", kwargs=reload_kwargs(folder))
            self._api("reset_prefix_cache")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def shutdown(self) -> None:
        """Stop the async engine's loop (async mode); the offline engine is freed with the object."""
        if self.async_engine:
            if hasattr(self.llm, "shutdown"):
                self.llm.shutdown()
            self._loop.call_soon_threadsafe(self._loop.stop)


def reload_kwargs(folder: str) -> dict[str, Any]:
    """What ``collective_rpc("reload_weights", kwargs=...)`` carries: a path and a flag, no tensors."""
    return {"weights_path": str(folder), "is_checkpoint_format": True}
