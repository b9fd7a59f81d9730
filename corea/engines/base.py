"""One generation interface for training rollouts, evaluation and serving.

A prompt is either a plain string (used verbatim as model input) or a list of chat messages
(``[{"role": "user", "content": ...}]``) rendered with the tokenizer's chat template and a generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Protocol, Sequence, Union, runtime_checkable

ChatMessages = list[dict[str, str]]
Prompt = Union[str, ChatMessages]


class EngineInputError(ValueError):
    """The request cannot be served as given (bad prompt, too long for the context): a client error."""


class EngineUnavailable(RuntimeError):
    """The engine can no longer serve (e.g. vLLM's engine core process died): not the request's fault; the
    replica holding it reports unhealthy and is replaced."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by every backend (the vLLM names)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    min_tokens: int = 0  # EOS and stop_token_ids are masked, stop strings unchecked, until this many tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end a sample, like EOS (kept in token_ids)
    include_stop_str_in_output: bool = False  # keep a matched stop string at the end of ``text`` (vLLM's name)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))


@dataclass
class Sample:
    """One sampled completion.

    ``token_ids`` are the generated ids, including the EOS or stop token id that ended the sample (and, for a stop
    string, every token up to the one completing it); ``logprobs`` has one entry per id. ``text`` is the decoded
    output without special tokens, cut before a matched stop string.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]  # log p(token | prefix) of each output token under the sampling model, nats
    finish_reason: str  # "stop" (EOS or a stop string) or "length"

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_token_prob(self) -> float:
        """exp(log p) averaged over output tokens: the AvgProb baseline's confidence."""
        import math

        if not self.logprobs:
            return 0.0
        return sum(math.exp(lp) for lp in self.logprobs) / len(self.logprobs)


@dataclass
class Generation:
    """The n samples drawn for one prompt."""

    prompt_token_ids: list[int]
    samples: list[Sample] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The model input text: a string verbatim, chat messages through the chat template with a generation prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in prompt
    ):
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    raise ValueError("a prompt is a string or a non-empty list of {'role': str, 'content': str} messages")


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Prompt token ids. Plain strings get the tokenizer's special tokens (e.g. a BOS); rendered chats do not,
    since the chat template already wrote them."""
    ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=isinstance(prompt, str))["input_ids"]
    if not ids:
        raise ValueError("empty prompt")
    return list(ids)


def encode_continuation(tokenizer: Any, prompt: Prompt, prefix: str) -> list[int]:
    """Token ids of ``prompt`` followed by ``prefix``, the start of the assistant message that the model continues
    (the question is not re-asked): the prompt as ``encode_prompt`` gives it, the prefix tokenized on its own,
    as a response is tokenized in training."""
    ids = encode_prompt(tokenizer, prompt)
    return ids + (list(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else [])


def check_prompts(prompts: Sequence[Prompt]) -> list[Prompt]:
    """``prompts`` as a list; a lone string or message list is rejected (wrap it in a list)."""
    if isinstance(prompts, (str, Mapping)) or (
        isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], Mapping)
    ):
        raise ValueError("generate takes a sequence of prompts; wrap a single prompt in a list")
    return list(prompts)


@runtime_checkable
class Engine(Protocol):
    """What every backend provides."""

    model_path: str

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None) -> list[Generation]:
        """n samples per prompt, in prompt order."""

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> AsyncIterator[str]:
        """Async iterator of text deltas for one sample of one prompt (serving)."""

    def update_weights(self, state_dict: Mapping[str, Any]) -> None:
        """Load new parameters (name -> tensor, the policy's Hugging Face names) into the engine."""
