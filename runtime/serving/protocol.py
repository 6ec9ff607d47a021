"""The OpenAI API's requests, typed (pydantic, strict), and its responses, built: /v1/completions, /v1/chat/completions.

A request's fields are typed here and nowhere else: strict JSON types (`"5"` is not a number, `1` is not a boolean),
no NaN or Infinity. What they may be is runtime.params.SamplingParams' to say: `to_params` turns a request into
SamplingParams (the endpoint's defaults where a field is left out: `ENTRY_DEFAULTS`), whose check is the one place
a value is refused; its ParamError names the field as SamplingParams does, and `API_NAMES` turns that into the
request's own field name for the error body (`{"error": {"message", "type", "param", "code"}}`). A field OpenAI has
and this server does not do is refused by name rather than ignored. Extensions beside OpenAI's fields, as vLLM
takes them: top_k, min_p, repetition_penalty, ignore_eos.
"""

from __future__ import annotations

import time
import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..params import ENTRY_DEFAULTS, ParamError, SamplingParams

# SamplingParams' names that a request spells otherwise
API_NAMES = {"max_new_tokens": "max_tokens"}


class APIError(Exception):
    """An OpenAI error response: `status` and the error body's fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Unsupported(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


UNSUPPORTED = {
    "best_of": "only best_of=1 is served: send n instead",
    "echo": "echo is not served: the prompt is the caller's already",
    "suffix": "suffix (fill in the middle) is not served: Gemma's base models are not trained for it",
    "presence_penalty": "use repetition_penalty (an extension), presence_penalty is not served",
    "frequency_penalty": "use repetition_penalty (an extension), frequency_penalty is not served",
    "logit_bias": "logit_bias is not served",
}


def text(value: str, param: str) -> str:
    """`value` if it is valid Unicode text (a lone surrogate such as "\\ud800" is not: no tokenizer takes it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ParamError(param, f"{param} holds {value[e.start:e.end]!r} at {e.start}, which is not valid Unicode "
                                "text (a lone surrogate); send UTF-8 text") from None
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _Sampling(BaseModel):
    """What both endpoints take. Unknown fields are ignored, as OpenAI does; known ones we do not do are refused.
    None: not given (the endpoint's default, from runtime.params)."""

    # extra fields are kept (and ignored) so that grammar.spec_from_request sees the legacy guided_* ones
    model_config = ConfigDict(extra="allow", strict=True, ser_json_inf_nan="null")

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, allow_inf_nan=False)
    top_p: float | None = Field(None, allow_inf_nan=False)
    top_k: int | None = None  # extension
    min_p: float | None = Field(None, allow_inf_nan=False)  # extension
    repetition_penalty: float | None = Field(None, allow_inf_nan=False)  # extension
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None  # extension (vLLM's): go on past the end token, to max_tokens (benchmarks)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, allow_inf_nan=False)
    logit_bias: dict | None = None
    user: str | None = None
    response_format: dict | None = None  # text, json_object, json_schema (runtime/serving/grammar.py)
    structured_outputs: dict | None = None  # vLLM's: json, regex, choice, grammar, json_object

    @model_validator(mode="after")
    def _unsupported(self):
        refuse = {"presence_penalty": self.presence_penalty != 0, "frequency_penalty": self.frequency_penalty != 0,
                  "logit_bias": bool(self.logit_bias)}
        for name, asked in refuse.items():
            if asked:
                raise Unsupported(name, UNSUPPORTED[name])
        return self

    entry: ClassVar[str] = "completions"  # which of runtime.params.ENTRY_DEFAULTS

    def _given(self) -> dict:
        names = set(SamplingParams.fields()) - {"max_new_tokens", "stop", "logprobs"}
        given = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.max_tokens is not None:
            given["max_new_tokens"] = self.max_tokens
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            given["stop"] = tuple(text(s, "stop") for s in stops)
        return given

    def to_params(self) -> SamplingParams:
        """The request's SamplingParams (ParamError naming the field, as SamplingParams does)."""
        return SamplingParams(**{**ENTRY_DEFAULTS[self.entry], **self._given()})

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt a request: send the prompts one request each")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value

    @model_validator(mode="after")
    def _completion_only(self):
        for name, asked in (("echo", self.echo), ("suffix", self.suffix is not None),
                            ("best_of", self.best_of not in (None, 1))):
            if asked:
                raise Unsupported(name, UNSUPPORTED[name])
        return self

    def _given(self) -> dict:
        given = super()._given()
        if self.logprobs is not None:
            given["logprobs"] = self.logprobs
        return given

    def prompt_text(self) -> str | None:
        return text(self.prompt, "prompt") if isinstance(self.prompt, str) else None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant's calls, {"id", "type": "function", "function": {...}}
    tool_call_id: str | None = None  # a tool message's answer to one of them
    name: str | None = None

    def as_template_message(self) -> dict:
        """The message as chat templates and runtime/serving/tools.py take it (developer is system)."""
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        message = {"role": "system" if self.role == "developer" else self.role,
                   "content": text(content, "messages") if content is not None else None}
        message.update({k: getattr(self, k) for k in ("tool_calls", "tool_call_id", "name") if getattr(self, k)})
        if message["content"] is None and not self.tool_calls:
            raise ParamError("messages", f"a {self.role} message needs content")
        return message


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None  # runtime/serving/tools.py checks them
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    entry: ClassVar[str] = "chat"

    def _given(self) -> dict:
        given = super()._given()
        if self.max_completion_tokens is not None:
            given["max_new_tokens"] = self.max_completion_tokens
        if self.logprobs:
            given["logprobs"] = self.top_logprobs or 0
        elif self.top_logprobs is not None:
            raise ParamError("top_logprobs", "top_logprobs needs logprobs: true")
        return given

    def api_name(self, param: str) -> str:
        if param == "max_new_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        if param == "logprobs":
            return "top_logprobs"
        return {"prompt": "messages"}.get(param, API_NAMES.get(param, param))


def api_name(body, param: str) -> str:
    """The request's name for SamplingParams' (or the engine's) `param`: a request type that spells fields its own
    way says so with an `api_name` method (chat, responses)."""
    if hasattr(body, "api_name"):
        return body.api_name(param)
    return API_NAMES.get(param, param)


# -- responses --------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_logprobs(pieces, decode, offset: int) -> dict:
    """OpenAI's completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for piece in pieces:
        for token, (logprob, top) in zip(piece.tokens, piece.logprobs):
            text = decode(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append({decode(t): lp for t, lp in top})
            out["text_offset"].append(offset)
            offset += len(text)
    return out


def chat_logprobs(pieces, decode) -> dict:
    """OpenAI's chat `logprobs`: content, a list of {token, logprob, bytes, top_logprobs}."""
    content = []
    for piece in pieces:
        for token, (logprob, top) in zip(piece.tokens, piece.logprobs):
            text = decode(token)
            content.append({"token": text, "logprob": logprob, "bytes": list(text.encode()),
                            "top_logprobs": [{"token": decode(t), "logprob": lp, "bytes": list(decode(t).encode())}
                                             for t, lp in top]})
    return {"content": content}
