"""OpenAI request bodies: types checked by pydantic, values and unsupported features checked here.

Error codes (docs/SERVE.md): a body that is not a JSON object -> 400; a field of the wrong type or a
required field missing -> 422 (the schema); a value of the right type that is out of range or asks for
something this server does not do (n > 1, logprobs, penalties) -> 400; prompt beyond the context ->
400 `context_length_exceeded`; unknown model -> 404; body over the limit -> 413.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

Number = Union[StrictInt, StrictFloat]
MAX_STOP = 4  # OpenAI's limit on stop sequences
SEED_LIMIT = 2**63
# pydantic names the member of a union that failed in the error location: not a field name
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|(list|dict|literal|function-\w+)\[.*\])$")


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # Unknown fields are ignored (clients send fields of newer API versions); known ones are typed.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: StrictBool | None = False


class _Sampling(_Request):
    model: StrictStr | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = 1
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None
    user: StrictStr | None = None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    echo: StrictBool | None = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ContentPart(_Request):
    type: StrictStr
    text: StrictStr | None = None


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None


class ResponseFormat(_Request):
    type: StrictStr


class ChatRequest(_Sampling):
    messages: list[Message]
    max_tokens: StrictInt | None = None  # default: what the context leaves
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: ResponseFormat | None = None


@dataclass
class Job:
    """What the engine is asked to do, after checks (token ids ready)."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def parse(cls: type[_Request], raw: bytes) -> _Request:
    """Body bytes -> a request model: 400 for anything but a JSON object, 422 for wrong types."""
    import json

    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not _TYPE_TAG.match(str(p)))
        what = "is required" if err["type"] == "missing" else f"has the wrong type: {err['msg']}"
        raise APIError(422, f"'{loc}' {what}", param=loc or None, code="invalid_type") from None


def _refuse(condition: bool, message: str, param: str) -> None:
    if condition:
        raise APIError(400, message, param=param, code="unsupported_parameter")


def sampling(req: _Sampling) -> tuple[float, float, int | None, list[str]]:
    """temperature, top_p, seed and stop after range checks (OpenAI's defaults: 1.0, 1.0)."""
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    if not math.isfinite(temperature) or not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be in [0, 2], got {req.temperature}", "temperature", "invalid_value")
    if not math.isfinite(top_p) or not 0 <= top_p <= 1:
        raise APIError(400, f"top_p must be in [0, 1], got {req.top_p}", "top_p", "invalid_value")
    if top_p == 0:  # nucleus of one token: greedy
        temperature, top_p = 0.0, 1.0
    if req.seed is not None and not 0 <= req.seed < SEED_LIMIT:
        raise APIError(400, f"seed must be in [0, 2^63), got {req.seed}", "seed", "invalid_value")
    if req.n is not None and req.n != 1:
        raise APIError(400, f"only n = 1 is supported, got {req.n}", "n", "unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        _refuse(value not in (None, 0, 0.0), f"{name} is not supported (give 0 or leave it out)", name)
    _refuse(bool(req.logit_bias), "logit_bias is not supported", "logit_bias")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop sequences, got {len(stop)}", "stop", "invalid_value")
    return temperature, top_p, req.seed, stop


def check_max_tokens(value: int | None, param: str, context: int) -> None:
    if value is not None and not 1 <= value <= context:
        raise APIError(400, f"{param} must be in [1, {context}] (the model's context), got {value}", param,
                       "invalid_value")


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request (text, or token ids)."""
    _refuse(bool(req.echo), "echo is not supported", "echo")
    _refuse(req.logprobs is not None, "logprobs is not supported", "logprobs")
    _refuse(req.best_of not in (None, 1), "best_of > 1 is not supported", "best_of")
    _refuse(req.suffix is not None, "suffix is not supported", "suffix")
    prompt = req.prompt
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], list):  # list of token-id lists
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request (this server answers n = 1)", "prompt", "unsupported_value")
        return list(prompt[0])
    if prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request (this server answers n = 1)", "prompt", "unsupported_value")
        return prompt[0]
    return list(prompt)  # token ids (possibly empty: refused when encoded)


def chat_messages(req: ChatRequest) -> list[dict]:
    """Messages as the chat template takes them ({"role", "content"} strings)."""
    _refuse(bool(req.logprobs), "logprobs is not supported", "logprobs")
    _refuse(req.top_logprobs is not None, "top_logprobs is not supported", "top_logprobs")
    _refuse(bool(req.tools) or bool(req.functions), "tools and functions are not supported", "tools")
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, f"response_format {req.response_format.type!r} is not supported (only 'text')",
                       "response_format", "unsupported_value")
    if not req.messages:
        raise APIError(400, "messages must hold at least one message", "messages", "invalid_value")
    out = []
    for i, m in enumerate(req.messages):
        if m.content is None or isinstance(m.content, str):
            content = m.content or ""
        else:
            texts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{i}]: content parts of type {part.type!r} are not supported "
                                        "(text only)", f"messages.{i}.content", "unsupported_value")
                texts.append(part.text)
            content = "".join(texts)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "time": "length"}


def finish_reason(reason: str) -> str:
    """llmflash's finish reasons in OpenAI's words."""
    return FINISH_REASONS.get(reason, "stop")
