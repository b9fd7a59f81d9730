"""The transformers backend: batched, left-padded generation with a KV cache, on CPU or GPU.

Decoding is a manual token loop rather than ``model.generate`` so that it can

- prefill each distinct prompt once and fan its KV cache out to the ``n`` samples;
- drop finished samples from the batch (EOS, stop token, stop string) instead of padding them on;
- draw every sample from its own random stream: with ``SamplingParams.seed`` set, sample ``k`` of a prompt uses
  uniforms derived from ``(seed, prompt token ids, k)`` only, so results do not depend on the batch size or on the
  other prompts, and distinct prompts do not share random numbers;
- report, for every sampled token, its log-probability under the *unmodified* model distribution (softmax of the
  raw logits: temperature 1, no top-p), which is what GRPO's importance ratios need.

Sampling is inverse-CDF sampling on the temperature/top-p adjusted distribution with one uniform per step.
Temperature below 1e-5 is greedy (argmax).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Sequence

import torch

from corea.engines.base import (
    EngineInputError,
    Generation,
    Prompt,
    Sample,
    SamplingParams,
    check_prompts,
    encode_continuation,
    encode_prompt,
    render_prompt,
)
from corea.models.loading import load_model_and_tokenizer, resolve_device

GREEDY_TEMPERATURE = 1e-5  # temperatures below this decode greedily


@dataclass
class _Row:
    """One sample being decoded."""

    prompt: int  # index into the request's prompts
    uniforms: torch.Tensor | None  # [max_tokens] in (0, 1), None for greedy
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


def sample_seed(seed: int, prompt_token_ids: Sequence[int], index: int) -> int:
    """The 63-bit seed of sample ``index`` of a prompt in a request seeded with ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{index}:{','.join(map(str, prompt_token_ids))}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids [B] drawn from ``logits`` [B, V] by inverse CDF with one uniform in (0, 1) per row."""
    probs = torch.softmax(logits / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        cum = probs.cumsum(dim=-1)
        probs = probs.masked_fill(cum - probs > top_p, 0.0)  # keep the smallest prefix reaching top_p
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target).clamp_(max=cdf.shape[-1] - 1)
    return (order.gather(1, idx) if order is not None else idx).squeeze(-1)


class HFEngine:
    """Generation with a Hugging Face causal LM.

    Options: ``device`` ("cpu", "cuda", None = auto), ``dtype`` ("auto", "float32", "bfloat16", "float16"),
    ``max_batch_size`` (sequences decoded together), ``seed`` (the engine's random stream for unseeded requests).
    All public methods are serialized by ``self.lock`` (a re-entrant lock), so concurrent callers are safe.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str | None = None,
        dtype: str = "auto",
        max_batch_size: int = 64,
        seed: int | None = None,
        **model_kwargs: Any,
    ) -> None:
        if int(max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model_path = str(model_path)
        self.device = resolve_device(device)
        self.model, self.tokenizer = load_model_and_tokenizer(model_path, dtype, self.device, **model_kwargs)
        self.max_batch_size = int(max_batch_size)
        self.lock = threading.RLock()
        self._rng = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(7), "little"))
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(int(t) for t in eos)
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        forward_args = inspect.signature(self.model.forward).parameters
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_args else {}
        # the KV cache's keyword: ``cache`` from transformers 5.2x on (``past_key_values`` is deprecated there)
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"

    # ---------------------------------------------------------------- prompts
    def render(self, prompt: Prompt) -> str:
        """The model input text: a string verbatim, chat messages through the chat template."""
        return render_prompt(self.tokenizer, prompt)

    def encode(self, prompt: Prompt) -> list[int]:
        """Prompt token ids (special tokens added to plain strings only, as the chat template has them).
        A prompt the tokenizer cannot take (a lone surrogate, a malformed message) raises ``EngineInputError``."""
        try:
            return encode_prompt(self.tokenizer, prompt)
        except EngineInputError:
            raise
        except (TypeError, ValueError, UnicodeError) as exc:
            raise EngineInputError(f"the prompt cannot be tokenized ({type(exc).__name__})") from exc

    # ---------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None) -> list[Generation]:
        """n samples per prompt, in prompt order (see the module docstring for the sampling rules)."""
        return self._generate(prompts, params or SamplingParams())

    def continue_prompts(self, items: Sequence[tuple[Prompt, str]], params: SamplingParams | None = None
                         ) -> list[Generation]:
        """n samples per ``(prompt, assistant prefix)``: the model continues the assistant message after
        ``prefix`` (``encode_continuation``); ``prompt_token_ids`` include the prefix's tokens."""
        encoded = [encode_continuation(self.tokenizer, p, prefix) for p, prefix in items]
        return self._generate([], params or SamplingParams(), encoded=encoded)

    def _generate(self, prompts: Sequence[Prompt], params: SamplingParams, on_step=None,
                  encoded: list[list[int]] | None = None) -> list[Generation]:
        if encoded is None:
            encoded = [self.encode(p) for p in check_prompts(prompts)]
        for ids in encoded:
            if len(ids) + params.max_tokens > self.max_model_len:
                raise EngineInputError(
                    f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                    f"{self.max_model_len} positions"
                )
        greedy = params.temperature < GREEDY_TEMPERATURE
        with self.lock:
            rows = []
            for p in range(len(encoded)):
                for k in range(params.n):
                    uniforms = None if greedy else self._uniforms(params, encoded[p], k)
                    rows.append(_Row(prompt=p, uniforms=uniforms))
            order = sorted(range(len(rows)), key=lambda r: (-len(encoded[rows[r].prompt]), r))
            for start in range(0, len(order), self.max_batch_size):
                batch = [rows[r] for r in order[start : start + self.max_batch_size]]
                self._decode(batch, encoded, params, greedy, on_step)
        out = [Generation(prompt_token_ids=ids) for ids in encoded]
        for row in rows:
            out[row.prompt].samples.append(self._finish(row, params))
        return out

    def _uniforms(self, params: SamplingParams, prompt_ids: list[int], index: int) -> torch.Tensor:
        """``max_tokens`` uniforms in (0, 1): from the request seed if any, else from the engine's stream."""
        if params.seed is None:
            gen = self._rng
        else:
            gen = torch.Generator().manual_seed(sample_seed(params.seed, prompt_ids, index))
        return torch.rand(params.max_tokens, generator=gen, dtype=torch.float64).clamp_(min=1e-12).float()

    @torch.inference_mode()
    def _decode(self, rows: list[_Row], encoded: list[list[int]], params, greedy: bool, on_step) -> None:
        """Decode ``rows`` together until each is finished; results are written into the rows."""
        dev = self.device
        unique = sorted({r.prompt for r in rows})
        slot = {p: i for i, p in enumerate(unique)}
        width = max(len(encoded[p]) for p in unique)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(unique), width), pad, dtype=torch.long)
        mask = torch.zeros((len(unique), width), dtype=torch.long)
        for i, p in enumerate(unique):
            ids = encoded[p]
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_(min=0),
            use_cache=True,
            **self._last_logits_only,
        )
        fan = torch.tensor([slot[r.prompt] for r in rows], device=dev)
        cache = getattr(out, self._cache_arg) if self._cache_arg == "past_key_values" else out["cache"]
        cache.reorder_cache(fan)  # each sample gets its own copy of its prompt's KV cache
        logits, mask = out.logits[:, -1][fan], mask[fan]
        positions = mask.sum(-1)
        uniforms = None if greedy else torch.stack([r.uniforms for r in rows]).to(dev)
        stop_ids = self.eos_token_ids | set(params.stop_token_ids)
        window = 4 * max((len(s) for s in params.stop), default=0) + 2  # tokens covering any stop string
        alive = list(range(len(rows)))
        alive_idx = None
        banned = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev) if params.min_tokens else None
        for step in range(params.max_tokens):
            logits = raw = logits.float()
            if step < params.min_tokens and len(banned):  # vLLM's min_tokens: no EOS / stop token id yet
                logits = raw.index_fill(-1, banned, float("-inf"))
            if greedy:
                tokens = logits.argmax(-1)
            else:
                rows_u = uniforms[:, step] if len(alive) == len(rows) else uniforms[alive_idx, step]
                tokens = sample_tokens(logits, params.temperature, params.top_p, rows_u)
            logprobs = torch.log_softmax(raw, -1).gather(1, tokens.unsqueeze(-1)).squeeze(-1)  # the model's own
            keep = []
            for j, (tok, lp) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
                row = rows[alive[j]]
                row.token_ids.append(tok)
                row.logprobs.append(lp)
                if tok in stop_ids:
                    row.finish_reason = "stop"
                elif (params.stop and len(row.token_ids) > params.min_tokens
                      and self._has_stop(row.token_ids[-window:], params.stop)):
                    row.finish_reason = "stop"
                elif len(row.token_ids) >= params.max_tokens:
                    row.finish_reason = "length"
                else:
                    keep.append(j)
            if on_step is not None and on_step(rows):
                for j in keep:
                    rows[alive[j]].finish_reason = "abort"
                keep = []
            if not keep:
                return
            if len(keep) < len(alive):
                idx = torch.tensor(keep, device=dev)
                cache.reorder_cache(idx)
                tokens, mask, positions = tokens[idx], mask[idx], positions[idx]
                alive = [alive[j] for j in keep]
                alive_idx = torch.tensor(alive, device=dev)
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            out = self.model(
                input_ids=tokens.unsqueeze(-1),
                attention_mask=mask,
                position_ids=positions.unsqueeze(-1),
                **{self._cache_arg: cache},
                use_cache=True,
            )
            positions = positions + 1
            logits = out.logits[:, -1]

    def _has_stop(self, token_ids: list[int], stop: tuple[str, ...]) -> bool:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return any(s in text for s in stop)

    def _finish(self, row: _Row, params: SamplingParams) -> Sample:
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        if params.stop and row.finish_reason == "stop":
            # the first match ending after the min_tokens prefix (the one that stopped decoding)
            head = (len(self.tokenizer.decode(row.token_ids[: params.min_tokens], skip_special_tokens=True))
                    if params.min_tokens else 0)
            cuts = [(i, len(s)) for i, s in ((text.find(s, max(0, head - len(s) + 1)), s) for s in params.stop)
                    if i >= 0]
            if cuts:
                at, width = min(cuts)
                text = text[: at + width] if params.include_stop_str_in_output else text[:at]
        return Sample(text=text, token_ids=row.token_ids, logprobs=row.logprobs, finish_reason=row.finish_reason)

    # ---------------------------------------------------------------- streaming
    async def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> AsyncIterator[str]:
        """Text deltas of one sample, as they are decoded; they concatenate to that sample's ``text``.

        Generation runs in a worker thread holding the engine lock; closing the iterator early stops it.
        """
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream draws one sample; n must be 1, got {params.n}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        done = object()
        holdback = max((len(s) for s in params.stop), default=1) - 1  # a stop string may still be forming
        emitted = [""]

        def put(item: object) -> None:
            if not cancel.is_set():  # after an abandoned stream the consumer's loop may be closed
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except RuntimeError:
                    cancel.set()

        def emit(text: str) -> None:
            if text.startswith(emitted[0]) and len(text) > len(emitted[0]):
                put(text[len(emitted[0]) :])
                emitted[0] = text

        def on_step(rows: list[_Row]) -> bool:
            if rows[0].finish_reason is None:
                text = self.tokenizer.decode(rows[0].token_ids, skip_special_tokens=True).rstrip("\ufffd")
                emit(text[: len(text) - holdback])
            return cancel.is_set()

        def work() -> None:
            try:
                sample = self._generate([prompt], params, on_step)[0].samples[0]
                emit(sample.text)
                put(done)
            except BaseException as exc:  # handed to the consumer
                put(exc)

        self.encode(prompt)  # reject a bad prompt (EngineInputError) before starting the thread
        thread = threading.Thread(target=work, name="corea-hf-stream", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()

    # ---------------------------------------------------------------- weights
    def update_weights(self, state_dict: Mapping[str, Any]) -> None:
        """Copy tensors (Hugging Face parameter names; all or a subset) into the model, in place.

        Values may be tensors of any dtype/device or arrays; names and shapes are checked before anything is
        copied, so a bad update leaves the model unchanged.
        """
        with self.lock, torch.no_grad():
            targets = self.model.state_dict(keep_vars=True)
            unknown = sorted(set(state_dict) - set(targets))
            if unknown:
                shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
                raise ValueError(f"{len(unknown)} unknown parameter name(s) for {self.model_path}: {shown}")
            values = {name: torch.as_tensor(value) for name, value in state_dict.items()}
            for name, value in values.items():
                if tuple(value.shape) != tuple(targets[name].shape):
                    raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(targets[name].shape)}")
            for name, value in values.items():
                targets[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's current parameters by Hugging Face name (CPU copies)."""
        with self.lock:
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

