"""The OpenAI API's requests, checked (pydantic), and its responses, built: /v1/completions, /v1/chat/completions.

A field out of range, of the wrong type or missing is a 400 with OpenAI's error body naming it
(`{"error": {"message", "type", "param", "code"}}`); a field OpenAI has and we do not do (n > 1, echo, suffix,
logit_bias, the penalties, tools) is refused by name rather than ignored. Extensions beside OpenAI's fields, as
vLLM takes them: top_k, min_p, repetition_penalty, ignore_eos.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LOGPROBS = 20


class APIError(Exception):
    """An OpenAI error response: `status` and the error body's fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What both endpoints take. Unknown fields are ignored, as OpenAI does; known ones we do not do are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int = Field(0, ge=-1)  # extension; 0 or -1: off
    min_p: float = Field(0.0, ge=0.0, lt=1.0)  # extension
    repetition_penalty: float = Field(1.0, gt=0.0)  # extension
    ignore_eos: bool = False  # extension (vLLM's): go on past the end token, to max_tokens (benchmarks)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        refuse = {"n": self.n != 1, "presence_penalty": self.presence_penalty != 0,
                  "frequency_penalty": self.frequency_penalty != 0, "logit_bias": bool(self.logit_bias)}
        for name, asked in refuse.items():
            if asked:
                raise Unsupported(name, UNSUPPORTED[name])
        return self

    def generation_options(self, max_new_tokens: int):
        from ..model import GenerationOptions

        return GenerationOptions(max_new_tokens=max_new_tokens, temperature=self.temperature,
                                 top_k=max(self.top_k, 0), top_p=self.top_p, min_p=self.min_p,
                                 repetition_penalty=self.repetition_penalty, seed=self.seed,
                                 stop_strings=list(self.stop or []))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


UNSUPPORTED = {
    "n": "only n=1 is served: send the request n times (with different seeds)",
    "best_of": "only best_of=1 is served",
    "echo": "echo is not served: the prompt is the caller's already",
    "suffix": "suffix (fill in the middle) is not served: Gemma's base models are not trained for it",
    "presence_penalty": "use repetition_penalty (an extension), presence_penalty is not served",
    "frequency_penalty": "use repetition_penalty (an extension), frequency_penalty is not served",
    "logit_bias": "logit_bias is not served",
    "tools": "tools and function calls are not served",
    "response_format": "only the text response format is served",
}


class Unsupported(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
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


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def as_template_message(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _chat_only(self):
        if self.tools:
            raise Unsupported("tools", UNSUPPORTED["tools"])
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise Unsupported("response_format", UNSUPPORTED["response_format"])
        return self


# -- responses --------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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
