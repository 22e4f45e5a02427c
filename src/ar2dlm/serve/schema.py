"""The OpenAI request and response bodies of /v1/completions and /v1/chat/completions.

A request body becomes a `Spec`: the prompts, how many choices, whether to
stream, and the decode settings as `DiffusionLM.decode_config` overrides.
The settings' values are checked by `DecodeConfig` (the CLI's and the API's
own checks); here only the body's shape is checked. A field the server would
ignore is refused, never dropped in silence (an unknown field, `logprobs`,
penalties), except the few that change nothing here (`user`, `store`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
"""The engine's finish reasons in OpenAI's words (an end-of-sequence token and a stop string are both "stop")."""

OPENAI = ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed")
EXTRA = ("sampler", "mix_weight", "draft_len", "proposals", "adaptive", "top_k", "ignore_eos")
"""ar2dlm's own fields (the `extra_body` of the openai client); all but ignore_eos are DecodeConfig fields."""
HARMLESS = {"user": None, "store": None, "metadata": None, "service_tier": None, "parallel_tool_calls": None,
            "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False, 0),
            "top_logprobs": (0,), "echo": (False,), "logit_bias": ({},), "best_of": (1,), "suffix": ("",),
            "tools": ([],), "tool_choice": ("none",), "response_format": ({"type": "text"},)}
"""Fields accepted without effect: any value (None), or only these values (or null); others are refused."""
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Spec:
    """One request: prompts (text or token ids; chat: one list of messages), choices per prompt, settings."""

    chat: bool
    prompts: list
    model: str | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    settings: dict = field(default_factory=dict)
    """DecodeConfig overrides (None = the model's default)."""


def parse(body, chat: bool) -> Spec:
    """A request body -> Spec; APIError 400 for a body that is not an object, 422 for a field that is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    own = ("messages", "max_completion_tokens") if chat else ("prompt",)
    unknown = sorted(set(body) - set(OPENAI) - set(EXTRA) - set(HARMLESS) - set(own))
    if unknown:
        raise APIError(422, f"unknown field(s) {unknown}; known: {sorted(set(OPENAI + EXTRA + own))}", unknown[0])
    for name, allowed in HARMLESS.items():
        if allowed is not None and body.get(name) is not None and body[name] not in allowed:
            raise APIError(422, f"{name}={body[name]!r} is not supported by this server "
                                f"(leave it out or give {allowed[0]!r})", name)
    spec = Spec(chat=chat, prompts=[_messages(body.get("messages"))] if chat else _prompts(body.get("prompt")))
    spec.model = _typed(body, "model", str)
    spec.n = _typed(body, "n", int, 1)
    if spec.n < 1:
        raise APIError(422, f"n must be >= 1, got {spec.n}", "n")
    spec.stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {})
    spec.include_usage = bool(options.get("include_usage"))
    spec.max_tokens = body.get("max_completion_tokens") if body.get("max_tokens") is None else body["max_tokens"]
    s = {k: body.get(k) for k in ("temperature", "top_p", "top_k", "seed", "sampler", "mix_weight", "draft_len",
                                 "proposals", "adaptive")}
    stop = body.get("stop")
    s["stop"] = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop
    if _typed(body, "ignore_eos", bool, False):
        s["eos_token_id"] = ()
    if s["sampler"] is None:  # OpenAI's sampling fields ask for sampling: lossless keeps the AR distribution
        sampled = _number(s["temperature"]) > 0 or _number(s["top_p"], 1) < 1 or _number(s["top_k"]) > 0
        s["sampler"] = "lossless" if sampled else "greedy"
    spec.settings = s
    return spec


def _typed(body: dict, name: str, kind, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        words = {int: "an integer", bool: "true or false", str: "a string", dict: "an object"}[kind]
        raise APIError(422, f"{name} must be {words}, got {value!r}", name)
    return value


def _number(x, default=0) -> float:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else default


def _prompts(prompt) -> list:
    """prompt: a string, a list of token ids, or a list of either (one choice set per prompt)."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(_is_id(t) for t in p)) for p in prompt):
        return list(prompt)
    raise APIError(422, "prompt must be a string, a list of token ids, or a non-empty list of strings or of "
                        f"token-id lists; got {_short(prompt)}", "prompt")


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _messages(messages) -> list[dict]:
    """messages: [{role, content}] with content a string or a list of {type: text, text} parts."""
    if not isinstance(messages, list) or not messages:
        raise APIError(422, f"messages must be a non-empty list of {{role, content}}; got {_short(messages)}",
                       "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(422, f"messages[{i}] must be an object with role one of {', '.join(ROLES)}; got "
                                f"{_short(m)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(422, f"messages[{i}].content must be a string or a list of text parts; got "
                                f"{_short(content)}", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------- responses
def result(spec: Spec, rid: str, created: int, model: str, choices: list[tuple[int, str, str]], usage: dict) -> dict:
    """The non-streaming body; choices: (index, text, finish_reason)."""
    if spec.chat:
        rows = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": FINISH.get(f, f)} for i, text, f in choices]
    else:
        rows = [{"index": i, "text": text, "logprobs": None, "finish_reason": FINISH.get(f, f)}
                for i, text, f in choices]
    return {"id": rid, "object": "chat.completion" if spec.chat else "text_completion", "created": created,
            "model": model, "choices": rows, "usage": usage}


def chunk(spec: Spec, rid: str, created: int, model: str, index: int | None, text: str | None,
          finish: str | None, usage: dict | None = None, role: bool = False) -> dict:
    """One streamed event: a choice's new text (and finish reason), or (index None) the closing usage."""
    if index is None:
        choices = []
    elif spec.chat:
        delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
        choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": FINISH.get(finish, finish)}]
    else:
        choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": FINISH.get(finish, finish)}]
    body = {"id": rid, "object": "chat.completion.chunk" if spec.chat else "text_completion", "created": created,
            "model": model, "choices": choices}
    if spec.include_usage:
        body["usage"] = usage
    return body
