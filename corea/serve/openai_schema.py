"""The OpenAI chat-completions wire format: request validation, response and chunk bodies, error bodies.

Unknown fields are accepted and ignored; ``null`` means the default, as in the OpenAI API; fields COREA
cannot honour (``n`` > 1, non-text content, ``logprobs``, ``tools``/``tool_choice``, a ``response_format``
other than text, ...; see ``UNSUPPORTED``) are rejected with 400 naming the field. Before parsing, a body
nested deeper than ``max_depth`` is refused (400), and after it, text that is not valid Unicode (a lone
surrogate such as ``"\\ud800"``) is refused (400). COREA's own request options travel in a ``corea`` object
(``extra_body`` in the OpenAI client): ``{"corea": {"threshold": 0.7}}``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from itertools import accumulate
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from corea.cost import MAX_THRESHOLD
from corea.protocol import INSTRUCTION


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def as_chat(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class CoreaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    threshold: float | None = Field(None, ge=0, le=MAX_THRESHOLD)  # tau of the chosen strategy's rule
    strategy: Literal["cascade", "steer", "stepwise_policy", "cope"] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


def _is_text_format(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") == "text"


# Fields COREA cannot honour -> the values that mean "not asked for" (anything else is a 400 naming the field).
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v == 0,
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "response_format": _is_text_format,
    "logit_bias": lambda v: v == {},
    "presence_penalty": lambda v: v == 0,
    "frequency_penalty": lambda v: v == 0,
    "audio": lambda v: False,
    "modalities": lambda v: v == ["text"],
    "prediction": lambda v: False,
}


class ChatRequest(BaseModel):
    """The fields of a chat completion request that COREA reads (a top-level ``null`` is the default)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str = Field(..., min_length=1)
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0, description="vLLM's extension: no end of sequence before this many tokens")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    corea: CoreaOptions = Field(default_factory=CoreaOptions)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, brackets inside strings not counted; linear
    in the size, without parsing (so that no parser recursion is ever reached)."""
    if raw.count(b"[") + raw.count(b"{") <= 1:
        return int(b"[" in raw or b"{" in raw)
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def _unsupported(data: dict[str, Any]) -> None:
    for name, accepted in UNSUPPORTED.items():
        value = data.get(name)
        if value is not None and not accepted(value):
            raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")


def parse_chat_request(raw: bytes, max_messages: int, max_depth: int = 32) -> ChatRequest:
    """A validated request from a raw body; ``ApiError(400)`` names the offending field."""
    if json_depth(raw) > max_depth:
        raise ApiError(400, f"the request body nests JSON deeper than {max_depth} levels")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 JSON"
        raise ApiError(400, f"the request body is not valid JSON: {reason}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(400, "the request body holds text that is not valid Unicode (a lone surrogate escape "
                            "such as \\ud800)") from None
    _unsupported(data)
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param) from None
    if len(request.messages) > max_messages:
        raise ApiError(400, f"at most {max_messages} messages per request", param="messages")
    if not any(m.role == "user" for m in request.messages):
        raise ApiError(400, "messages must contain a user message", param="messages")
    return request


def with_instruction(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages with the COREA instruction appended to the last user message (as ``build_prompt`` does);
    a message that already ends with it is left alone."""
    out = [dict(m) for m in messages]
    last = max(i for i, m in enumerate(out) if m["role"] == "user")
    text = out[last]["content"].strip()
    if not text.endswith(INSTRUCTION):
        out[last]["content"] = f"{text}\n{INSTRUCTION}"
    return out


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, text: str, finish_reason: str, usage: dict[str, int],
                    corea: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` object with COREA's metadata in ``corea``."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage,
        "corea": corea,
    }


def chunk_body(request_id: str, model: str, created: int, delta: dict[str, str] | None = None,
               finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` with no finish reason gives the usage-only chunk."""
    choices = [] if delta is None and finish_reason is None else [
        {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
    ]
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, **extra}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying JSON (or the literal ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def models_body(model_ids: list[str], owner: str = "corea") -> dict[str, Any]:
    created = int(time.time())
    return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": owner}
                                       for m in model_ids]}
