"""The OpenAI wire format of /v1/completions and /v1/chat/completions, as pydantic models (OpenAPI at /docs).

Requests are read as strictly as OpenAI's own schema reads them: a bool is not a number and a number is not
a bool, a field nobody defined is refused naming it, and a field this server would ignore is refused unless
it has its neutral value (`logprobs`, penalties, `logit_bias`, tools, JSON output, ...). ar2dlm's own fields
(`sampler`, `draft_len`, ...: the openai client's `extra_body`) belong to the models. The values of the decode
settings are checked later, by `DecodeConfig` (the CLI's own checks, the same messages); here their types.

Every error a client can cause is an `APIError`: an HTTP status and OpenAI's body
{"error": {"message", "type", "param", "code"}}. `refusal` turns pydantic's errors into one.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}
MAX_STOPS = 4
"""Stop strings a request may give (OpenAI's own limit)."""
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
"""The engine's finish reasons in OpenAI's words (an end-of-sequence token and a stop string are both "stop")."""


class APIError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers or {}

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": _text(str(self)), "type": kind, "param": _text(self.param), "code": self.code}}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    """The request field the error is about (`messages[0].role`), when there is one."""
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---------------------------------------------------------------------------- requests
class Strict(BaseModel):
    # OpenAI's types: 1 is no bool, true no number, "4" no integer; NaN and Infinity are not JSON numbers
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False
    """Send one more chunk before `[DONE]`: no choices, the request's token counts in `usage`."""


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    """The text, or a list of text parts (joined)."""
    name: str | None = None
    """Passed to the chat template with the message, as the template's own fields are."""

    def rendered(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text} | ({"name": self.name} if self.name is not None else {})


NEUTRAL: dict[str, tuple] = {
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "store": (False,),
    "echo": (False,), "best_of": (1,), "suffix": ("",), "top_logprobs": (0,),
    "tools": ([],), "tool_choice": ("none",)}
"""Fields the server does not act on, taken only at the value that asks for nothing (or null)."""


class Sampling(Strict):
    """The fields both endpoints take."""

    model: str | None = None
    """The model id (/v1/models); another id is a 404."""
    max_tokens: int | None = None
    """Most tokens to generate (default: the server's --default-max-tokens, cut to the room in the context)."""
    temperature: float | None = None
    """Softmax temperature; > 0 samples (sampler `lossless` unless another is given), 0 or absent is greedy."""
    top_p: float | None = None
    n: int | None = Field(None, ge=1)
    """Choices per prompt (seeded: choice 0 draws from seed, every other choice from a stream of its own)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    """Only with stream: true."""
    stop: str | list[str] | None = None
    """Stop strings: the text ends before the first one generated (finish_reason `stop`)."""
    seed: int | None = None
    """Seed of the sampling (0..2**64-1): a seeded sampled request reproduces its text."""
    user: str | None = None
    """An id of the end user, for the provider's records: this server keeps none, and the output is the same."""
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # ar2dlm's own (DecodeConfig's fields, but ignore_eos)
    sampler: str | None = None
    """greedy | lossless | mix (default: lossless when temperature > 0, top_p < 1 or top_k > 0 is given)."""
    mix_weight: float | None = None
    draft_len: int | None = None
    proposals: int | None = None
    adaptive: bool | None = None
    candidates: str | None = None
    """diffusion | suffix | both: the model's drafts, drafts from the request's own text, or both (default)."""
    top_k: int | None = None
    ignore_eos: bool = False
    """Do not stop at end-of-sequence (always max_tokens tokens; for load tests)."""

    @field_validator(*NEUTRAL, check_fields=False)
    @classmethod
    def _neutral(cls, value, info):
        if value is not None and value not in NEUTRAL[info.field_name]:
            raise _unsupported(info.field_name, value, NEUTRAL[info.field_name][0])
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOPS:  # each is looked for after every commit
            raise PydanticCustomError("limit", "stop takes at most {most} strings, got {n}",
                                      {"most": MAX_STOPS, "n": len(value)})
        return value

    @model_validator(mode="after")
    def _together(self):
        if self.stream_options is not None and not self.stream:
            raise APIError(422, "stream_options only applies with stream: true", "stream_options")
        return self

    def settings(self) -> dict:
        """The decode settings this request asks for: `DiffusionLM.decode_config` overrides (None = default)."""
        s = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "seed", "sampler", "mix_weight",
                                           "draft_len", "proposals", "adaptive", "candidates")}
        s["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if self.ignore_eos:
            s["eos_token_id"] = ()
        if s["sampler"] is None:  # OpenAI's sampling fields ask for sampling: lossless keeps the AR distribution
            sampled = (self.temperature or 0) > 0 or (self.top_p or 1) < 1 or (self.top_k or 0) > 0
            s["sampler"] = "lossless" if sampled else "greedy"
        return s

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


Prompt = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(Sampling):
    prompt: Prompt
    """A string, a list of token ids, or a list of either (each prompt gets n choices)."""
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None
    """Log probabilities are not served: leave it out (or null)."""

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value is not None:  # an integer asks for them, 0 too (the chosen token's own)
            raise _unsupported("logprobs", value)
        return value

    def prompts(self) -> list:
        p = self.prompt
        return [p] if isinstance(p, str) or not p or isinstance(p[0], int) else list(p)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value):
        if value != "text":
            raise PydanticCustomError("unsupported", "response_format {value} is not supported by this server (it "
                                      "does not constrain decoding): leave it out or give {text}",
                                      {"value": value, "text": '{"type": "text"}'})
        return value


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    """max_tokens under its newer name (give one of the two)."""
    response_format: ResponseFormat | None = None
    """Only {"type": "text"}: JSON output is refused, not promised."""
    logprobs: bool | None = None
    """Log probabilities are not served: false or left out."""
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _one_limit(self):
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise APIError(422, f"max_tokens={self.max_tokens} and max_completion_tokens="
                                f"{self.max_completion_tokens} disagree: give one", "max_completion_tokens")
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:
            raise _unsupported("logprobs", value, False)
        return value

    def prompts(self) -> list:
        return [[m.rendered() for m in self.messages]]


# ---------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a chat stream (`usage`: null, and set in the last one, with include_usage)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a completion stream."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ar2dlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------- pydantic's errors, in the API's words
KINDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
         "list_type": "an array", "dict_type": "an object", "model_type": "an object", "model_attributes_type":
         "an object", "finite_number": "a finite number"}
SHAPES = {"prompt": "a string, a list of token ids, or a list of strings or of token-id lists",
          "stop": "a string or a list of strings", "content": "a string or a list of text parts",
          "tool_choice": "a string or an object"}
"""What a field of several shapes takes (pydantic reports a mismatch once per shape)."""


def refusal(e: ValidationError) -> APIError:
    """The first of a body's errors as an APIError: 400 for a body that is no JSON object, 422 for a field."""
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        hint = " (a \\u escape must encode a character: a lone UTF-16 surrogate is none)" \
            if "surrogate" in first["msg"] or "hex escape" in first["msg"] else ""
        return APIError(400, f"the request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
                             f"{hint}")
    if not first["loc"]:
        return APIError(400, f"the request body must be a JSON object, got {_shown(first['input'])}")
    # a union reports each shape it tried: the error that went deepest is about the shape the value has
    error = max(errors, key=lambda x: len(_path(x["loc"])))
    path = _path(error["loc"])
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    kind, got = error["type"], _shown(error.get("input"))
    if kind == "missing":
        message = f"{param} is required"
    elif kind == "extra_forbidden":
        message = f"unknown field {param!r}: the fields this endpoint takes are listed at /docs"
    elif _is_tag(error["loc"][-1]) and path and path[-1] in SHAPES:
        message = f"{param} must be {SHAPES[path[-1]]}, got {got}"
    elif kind in KINDS:
        message = f"{param} must be {KINDS[kind]}, got {got}"
    elif kind == "literal_error":
        message = f"{param} must be {error['ctx']['expected']}, got {got}"
    elif kind == "greater_than_equal":
        message = f"{param} must be >= {error['ctx']['ge']}, got {got}"
    elif kind == "too_short":
        message = f"{param} must have at least {error['ctx']['min_length']} item(s), got {got}"
    elif kind in ("unsupported", "limit"):
        message = error["msg"]
    else:
        message = f"{param}: {error['msg'][0].lower()}{error['msg'][1:]}, got {got}"
    return APIError(422, message, param)


def _unsupported(field: str, value, neutral=None) -> PydanticCustomError:
    instead = "leave it out" + ("" if neutral is None else f" or give {_shown(neutral)}")
    return PydanticCustomError("unsupported", "{field}={value} is not supported by this server: {instead}",
                               {"field": field, "value": _shown(value), "instead": instead})


def _path(loc: tuple) -> list:
    return [p for p in loc if not _is_tag(p)]


def _is_tag(part) -> bool:
    """A union member's name in an error's location ('str', 'list[int]', 'TextPart'), not a field's."""
    return isinstance(part, str) and (not part.isidentifier() or part in ("str", "int", "float", "bool")
                                      or part[:1].isupper())


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _text(value: str | None) -> str | None:
    """Text any JSON encoder takes (a lone surrogate, which UTF-8 cannot encode, becomes its escape)."""
    return None if value is None else value.encode("utf-8", "backslashreplace").decode("utf-8")

