"""The vLLM backend (GPU). vLLM is imported inside functions only, so this module imports anywhere.

Two modes:

- offline (default): a ``vllm.LLM``; ``generate`` batches every prompt through ``LLM.generate``. ``stream``
  generates the whole sample and yields it as one delta.
- ``async_engine=True`` (serving): a vLLM ``AsyncLLM`` (``AsyncLLMEngine``) running on the engine's own event
  loop thread; ``stream`` yields token-level deltas and ``generate`` submits all requests concurrently.

Prompts are tokenized here with the checkpoint's tokenizer and chat template (the same code as the transformers
backend) and passed as token ids, so both backends see identical inputs. Log-probabilities are vLLM's default
``raw_logprobs``: the unmodified model distribution (temperature 1, no top-p), as in the transformers backend.

Weight updates go through ``collective_rpc`` to methods of ``WeightSyncExtension``, which every vLLM worker
inherits when the engine is built with ``worker_extension_cls=WORKER_EXTENSION`` (the default here). Each worker
receives full Hugging Face tensors and calls ``model.load_weights``, which fuses and shards them for tensor
parallelism. For trainers on other GPUs, the extension also offers vLLM's NCCL broadcast path
(``init_weight_update_group`` / ``update_weight_from_group``, after vLLM's RLHF example).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any, AsyncIterator, Mapping, Sequence

from corea.engines.base import Generation, Prompt, Sample, SamplingParams, check_prompts, encode_prompt

WORKER_EXTENSION = "corea.engines.vllm_engine.WeightSyncExtension"
UPDATE_CHUNK_BYTES = 512 * 1024**2  # weights sent per collective_rpc call


class WeightSyncExtension:
    """Methods mixed into every vLLM worker (``worker_extension_cls``); ``self`` is the worker."""

    def corea_load_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        """Load full (unsharded) Hugging Face tensors into this worker's model; returns how many."""
        weights = [(name, tensor.to(self.device, non_blocking=True)) for name, tensor in named_tensors]
        self.model_runner.model.load_weights(weights=weights)
        return len(weights)

    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int):
        """Join an NCCL group with the trainer (rank 0) for broadcast weight updates."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        rank = get_world_group().rank + rank_offset
        group = StatelessProcessGroup.create(host=master_address, port=master_port, rank=rank, world_size=world_size)
        self.corea_update_group = PyNcclCommunicator(group, device=self.device)

    def update_weight_from_group(self, name: str, dtype_name: str, shape: Sequence[int]) -> None:
        """Receive one tensor broadcast by the trainer (rank 0) and load it."""
        import torch

        weight = torch.empty(tuple(shape), dtype=getattr(torch, dtype_name), device=self.device)
        self.corea_update_group.broadcast(weight, src=0, stream=torch.cuda.current_stream())
        self.model_runner.model.load_weights(weights=[(name, weight)])
        del weight

    def corea_weight_checksum(self) -> float:
        """Sum of every parameter of this worker's shard (float64), to check an update arrived."""
        return float(sum(p.double().sum().item() for p in self.model_runner.model.parameters()))


def _vllm_params(params: SamplingParams):
    import vllm

    return vllm.SamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_tokens,
        seed=params.seed,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        include_stop_str_in_output=params.include_stop_str_in_output,
        logprobs=0,  # the sampled token's log-probability only
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


class VLLMEngine:
    """Generation with vLLM.

    Options (vLLM engine arguments): ``tensor_parallel_size``, ``dtype``, ``gpu_memory_utilization``,
    ``max_model_len``, ``load_format`` ("dummy" for benchmarks without weights), ``seed``,
    ``enable_prefix_caching``, ``enforce_eager``; any other keyword goes to ``vllm.LLM`` / ``AsyncEngineArgs``.
    ``async_engine=True`` selects the streaming engine.
    """

    def __init__(
        self,
        model_path: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        async_engine: bool = False,
        **options: Any,
    ) -> None:
        from corea.models.loading import load_tokenizer

        self.model_path = str(model_path)
        self.tokenizer = load_tokenizer(model_path)
        self.lock = threading.RLock()
        self.async_engine = bool(async_engine)
        self._ids = itertools.count()
        self._expected: dict[str, tuple[int, ...]] | None = None
        args = dict(
            model=self.model_path,
            tensor_parallel_size=int(tensor_parallel_size),
            dtype=dtype,
            gpu_memory_utilization=float(gpu_memory_utilization),
            seed=seed,
            enable_prefix_caching=enable_prefix_caching,
            worker_extension_cls=WORKER_EXTENSION,
            **options,
        )
        if self.async_engine:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="corea-vllm-loop", daemon=True)
            self._thread.start()
            self.llm = self._call(self._make_async(args))
        else:
            import vllm

            self.llm = vllm.LLM(**args)

    @staticmethod
    async def _make_async(args: dict[str, Any]):
        try:
            from vllm.v1.engine.async_llm import AsyncLLM as Engine
        except ImportError:  # older releases
            from vllm import AsyncLLMEngine as Engine
        from vllm.engine.arg_utils import AsyncEngineArgs

        return Engine.from_engine_args(AsyncEngineArgs(**args))

    def _call(self, coro):
        """Run a coroutine on the engine's loop and wait for it (async mode)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    # ---------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None) -> list[Generation]:
        """n samples per prompt, in prompt order."""
        params = params or SamplingParams()
        encoded = [self.encode(p) for p in check_prompts(prompts)]
        if not encoded:
            return []
        if self.async_engine:
            return self._call(self._agenerate_all(encoded, params))
        inputs = [{"prompt_token_ids": ids} for ids in encoded]
        with self.lock:
            outputs = self.llm.generate(inputs, _vllm_params(params), use_tqdm=False)
        return [to_generation(o, ids) for o, ids in zip(outputs, encoded)]

    def continue_prompts(self, items, params: SamplingParams | None = None) -> list[Generation]:
        """n samples per ``(prompt, assistant prefix)``, continuing the assistant message (see HFEngine)."""
        from corea.engines.base import encode_continuation

        params = params or SamplingParams()
        encoded = [encode_continuation(self.tokenizer, p, prefix) for p, prefix in items]
        if not encoded:
            return []
        if self.async_engine:
            return self._call(self._agenerate_all(encoded, params))
        with self.lock:
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], _vllm_params(params),
                                        use_tqdm=False)
        return [to_generation(o, ids) for o, ids in zip(outputs, encoded)]

    async def _agenerate(self, ids: list[int], params: SamplingParams) -> Generation:
        final = None
        request_id = f"corea-{next(self._ids)}"
        async for output in self.llm.generate({"prompt_token_ids": ids}, _vllm_params(params), request_id):
            final = output
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
                async for out in self.llm.generate({"prompt_token_ids": ids}, _vllm_params(params), request_id):
                    text = out.outputs[0].text  # cumulative (vLLM's default output kind)
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
    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes of the checkpoint's architecture (built on the meta device)."""
        if self._expected is None:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(self.model_path)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            self._expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return self._expected

    def update_weights(self, state_dict: Mapping[str, Any]) -> None:
        """Load new parameters (Hugging Face names, all or a subset) into every worker, then drop the prefix
        cache (it holds KV computed with the old weights)."""
        import torch

        expected = self._expected_shapes()
        unknown = sorted(set(state_dict) - set(expected))
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ValueError(f"{len(unknown)} unknown parameter name(s) for {self.model_path}: {shown}")
        chunks: list[list[tuple[str, Any]]] = [[]]
        size = 0
        for name, value in state_dict.items():
            tensor = torch.as_tensor(value).detach().cpu().contiguous()
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {expected[name]}")
            if size and size + tensor.nbytes > UPDATE_CHUNK_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append((name, tensor))
            size += tensor.nbytes
        with self.lock:
            if self.async_engine:
                self._call(self._aupdate(chunks))
            else:
                for chunk in chunks:
                    self.llm.collective_rpc("corea_load_weights", args=(chunk,))
                self.llm.reset_prefix_cache()

    async def _aupdate(self, chunks: list[list[tuple[str, Any]]]) -> None:
        for chunk in chunks:
            await self.llm.collective_rpc("corea_load_weights", args=(chunk,))
        await self.llm.reset_prefix_cache()

    def init_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """Join the trainer's NCCL group (trainer = rank 0; this engine's workers = ranks rank_offset ...)."""
        self._rpc("init_weight_update_group", (master_address, master_port, rank_offset, world_size))

    def receive_weights(self, specs: Sequence[tuple[str, str, Sequence[int]]]) -> None:
        """Receive the tensors the trainer broadcasts, in ``specs`` order (name, torch dtype name, shape)."""
        with self.lock:
            for name, dtype_name, shape in specs:
                self._rpc("update_weight_from_group", (name, dtype_name, list(shape)))
            self._rpc("reset_prefix_cache", None)

    def _rpc(self, method: str, args: tuple | None):
        if method == "reset_prefix_cache":
            call = self.llm.reset_prefix_cache()
        else:
            call = self.llm.collective_rpc(method, args=args)
        return self._call(call) if self.async_engine else call

    def weight_checksums(self) -> list[float]:
        """Per-worker parameter sums (see ``WeightSyncExtension.corea_weight_checksum``)."""
        if self.async_engine:
            return list(self._call(self.llm.collective_rpc("corea_weight_checksum")))
        return list(self.llm.collective_rpc("corea_weight_checksum"))

    def shutdown(self) -> None:
        """Stop the async engine's loop (async mode); the offline engine is freed with the object."""
        if self.async_engine:
            if hasattr(self.llm, "shutdown"):
                self.llm.shutdown()
            self._loop.call_soon_threadsafe(self._loop.stop)
