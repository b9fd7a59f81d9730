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
import time
import uuid
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


def _zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


# Fields COREA cannot honour -> the values that mean "not asked for" (anything else is a 400 naming the field).
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "logprobs": lambda v: v is False,
    "top_logprobs": _zero,
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "response_format": _is_text_format,
    "logit_bias": lambda v: v == {},
    "presence_penalty": _zero,
    "frequency_penalty": _zero,
    "audio": lambda v: False,
    "modalities": lambda v: v == ["text"],
    "prediction": lambda v: False,
}


# UNSUPPORTED as JSON schema: the accepted values of each field (null too), for the OpenAPI document
_UNSUPPORTED_SCHEMA: dict[str, dict[str, Any]] = {
    "logprobs": {"const": False}, "top_logprobs": {"const": 0}, "tools": {"type": "array", "maxItems": 0},
    "tool_choice": {"const": "none"}, "functions": {"type": "array", "maxItems": 0}, "function_call": {"const": "none"},
    "response_format": {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"]},
    "logit_bias": {"type": "object", "maxProperties": 0}, "presence_penalty": {"const": 0},
    "frequency_penalty": {"const": 0}, "audio": {"type": "null"}, "modalities": {"const": ["text"]},
    "prediction": {"type": "null"},
}
assert set(_UNSUPPORTED_SCHEMA) == set(UNSUPPORTED)


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
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63)  # int64, as OpenAI's
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


def json_depth(raw: bytes, limit: int | None = None) -> int:
    """The deepest nesting of arrays and objects in a JSON text, brackets inside strings not counted, without
    parsing (so that no parser recursion is ever reached): one pass of a three-state machine over the bytes
    (outside a string, in a string, just after a backslash in a string; a string left open runs to the end),
    each byte read once, so linear in the size whatever the bytes. With ``limit`` it stops as soon as the depth
    exceeds it (the value returned is then ``limit + 1``)."""
    depth = deepest = 0
    in_string = escaped = False
    for c in raw:  # ints: 34 ", 92 \\, 91 [, 123 {, 93 ], 125 }
        if in_string:
            if escaped:
                escaped = False
            elif c == 92:
                escaped = True
            elif c == 34:
                in_string = False
        elif c == 34:
            in_string = True
        elif c == 91 or c == 123:
            depth += 1
            if depth > deepest:
                deepest = depth
                if limit is not None and deepest > limit:
                    break
        elif c == 93 or c == 125:
            depth -= 1
    return deepest


def _unsupported(data: dict[str, Any]) -> None:
    for name, accepted in UNSUPPORTED.items():
        value = data.get(name)
        if value is not None and not accepted(value):
            raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")


def parse_chat_request(raw: bytes, max_messages: int, max_depth: int = 32) -> ChatRequest:
    """A validated request from a raw body; ``ApiError(400)`` names the offending field."""
    if json_depth(raw, max_depth) > max_depth:
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


# ---------------------------------------------------------------- the OpenAPI document (GET /openapi.json)
_REF = "#/components/schemas/{model}"
_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_COMPLETION_SCHEMA = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage", "corea"],
                      "properties": {"id": {"type": "string"}, "object": {"const": "chat.completion"},
                                     "created": {"type": "integer"}, "model": {"type": "string"},
                                     "choices": {"type": "array"}, "usage": {"type": "object"},
                                     "corea": {"type": "object"}}}
_STATUS_TEXT = {400: "invalid request", 401: "invalid or missing API key", 404: "unknown model",
                408: "the body arrived too slowly", 413: "the body is too large", 415: "the body is not JSON",
                503: "a tier is unavailable or overloaded (Retry-After)"}


def request_schema(models: list[str] | None = None, max_messages: int | None = None,
                   max_tokens: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON schema of a chat completion request as the server reads it (a top-level ``null`` is the default,
    unsupported fields take only their "not asked for" values; the served model ids and the limits when given)
    and the component schemas it refers to."""
    schema = ChatRequest.model_json_schema(ref_template=_REF)
    defs = schema.pop("$defs", {})
    props = schema["properties"]
    if models:
        props["model"] = {"type": "string", "enum": list(models)}
    if max_messages:
        props["messages"]["maxItems"] = max_messages
    for name in ("max_tokens", "max_completion_tokens"):
        if max_tokens:
            props[name]["anyOf"][0]["maximum"] = max_tokens
    props["stop"] = {"anyOf": [{"type": "string", "minLength": 1},
                               {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]}
    props.update(_UNSUPPORTED_SCHEMA)
    for name, prop in props.items():
        if name not in schema["required"] and not any(p.get("type") == "null" for p in prop.get("anyOf", [prop])):
            props[name] = {"anyOf": [prop, {"type": "null"}]}
    return schema, defs


def openapi_request_body() -> dict[str, Any]:
    """The ``requestBody`` of ``POST /v1/chat/completions`` (the route reads the raw body itself)."""
    return {"required": True, "content": {"application/json": {"schema": {"$ref": _REF.format(model="ChatRequest")}}}}


def openapi_responses(*statuses: int, completion: bool = False) -> dict[int, dict[str, Any]]:
    """FastAPI ``responses`` for a route: OpenAI-style errors with ``statuses``; with ``completion``, 200 as a
    ``chat.completion`` object or (``stream: true``) server-sent events."""
    error = {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}}
    out: dict[int, dict[str, Any]] = {s: {"description": _STATUS_TEXT[s], "content": error} for s in statuses}
    if completion:
        out[200] = {"description": "the answer", "content": {
            "application/json": {"schema": {"$ref": _REF.format(model="ChatCompletion")}},
            "text/event-stream": {"schema": {"type": "object", "required": ["data"],  # one event (OpenAPI < 3.2)
                                             "properties": {"data": {"type": "string"}}}}}}
    return out


def openapi_document(app, **request: Any) -> dict[str, Any]:
    """FastAPI's OpenAPI document of ``app`` with COREA's schemas (``request``: the arguments of
    ``request_schema``), and 400 (the status the API sends for an invalid parameter) where FastAPI documents 422."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    request, defs = request_schema(**request)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs, ChatRequest=request, ErrorResponse=_ERROR_SCHEMA, ChatCompletion=_COMPLETION_SCHEMA)
    for path in doc["paths"].values():
        for operation in path.values():
            responses = operation.get("responses", {})
            if "422" in responses:
                del responses["422"]
                responses.setdefault("400", openapi_responses(400)[400])
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return doc
