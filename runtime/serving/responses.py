"""The OpenAI Responses API (POST /v1/responses), stateless, served as a chat request is (as llama-server and vLLM
do): the request is typed here, turned into the chat path's values, and the chat path's output built back into a
Response object or its typed stream events.

    body = ResponsesRequest(...)                   # FastAPI parses it; refusals are protocol.Unsupported
    chat = to_chat(body)                           # messages, tools, tool_choice, response_format, max_tokens: chat's
    request_tools = tools.check_tools(chat.tools, chat.tool_choice)
    messages, variables = tools.prompt_messages(fmt, chat.messages, request_tools, native)
    spec = grammar.spec_from_response_format(chat.response_format)
    params = body.to_params()                      # SamplingParams, the chat endpoint's defaults

    out = ResponseBuilder(model_name, body)
    out.whole(text, tool_calls, finished)          # the Response object (tool_calls: tools.Reply's, chat's shape)
    out.start(); out.add(content, tool_deltas)...; out.end(finished) or out.fail(message)
                                                   # each a list of SSE strings: `event: TYPE\\ndata: {...}\\n\\n`

Stateless: nothing is kept after a response is sent. `previous_response_id`, `conversation` and item references are
refused by name (send the whole conversation as `input` items, as with chat); `store` is accepted either way and
nothing is stored (vLLM does the same when its store is off). Refused by name as well: built-in tools (web_search,
file_search...), `background`, `include`, `reasoning`, stored `prompt`s, `truncation: "auto"`, `top_logprobs` and
`text.verbosity`, and input parts other than text (the model reads text).
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, ClassVar, Literal, NamedTuple, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from ..params import ENTRY_DEFAULTS, SamplingParams
from .protocol import Unsupported, now
from .protocol import text as checked_text  # valid Unicode, or ParamError naming the field
from .scheduler import Finished
from .tools import NAME

ITEM_KINDS = ("message", "function_call", "function_call_output")
PART_KINDS = ("input_text", "output_text")
REFUSED = {
    "previous_response_id": "previous_response_id is not served: this server keeps no responses; send the "
                            "conversation so far as `input` items (messages, function_call, function_call_output)",
    "conversation": "conversation is not served: this server keeps no conversations; send them as `input` items",
    "background": "background responses are not served: this server keeps no responses to poll",
    "include": "include is not served: the response has its output text and function calls only",
    "reasoning": "reasoning is not served: Gemma's decoders have no separate reasoning to configure",
    "prompt": "stored prompts are not served: send the text as `instructions` and `input`",
    "truncation": 'truncation "auto" is not served: a conversation over the context is refused, as "disabled" does',
    "top_logprobs": "top_logprobs is not served on /v1/responses; /v1/chat/completions gives logprobs",
    "text.verbosity": "text.verbosity is not served; say how long the answer should be in the instructions",
}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


# -- the request -------------------------------------------------------------------------------------------


class TextPart(_Strict):
    """input_text (what users send) or output_text (an earlier answer sent back); either is text."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]

    def joined(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCall(_Strict):
    """A call the model made earlier, sent back (`response.output` items carry `id` and `status` too: ignored)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json(cls, value: str) -> str:
        try:
            json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"arguments must be JSON text ({e})") from None
        return value


class FunctionCallOutput(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]

    def joined(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_kind(item) -> str:
    return item.get("type", "message") if isinstance(item, dict) else item.type


InputItem = Annotated[Union[Annotated[InputMessage, Tag("message")], Annotated[FunctionCall, Tag("function_call")],
                            Annotated[FunctionCallOutput, Tag("function_call_output")]], Discriminator(_item_kind)]


class FunctionTool(_Strict):
    """Responses' function tool: flat, where chat nests it under "function"."""

    type: Literal["function"]
    name: str = Field(pattern=NAME.pattern)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    """text, json_object, or json_schema with name, schema, strict at the top level (chat nests them)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError('json_schema needs "name" and "schema" (a JSON schema object) beside "type"')
        return self

    def as_response_format(self) -> dict | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        body = {"name": self.name, "schema": self.schema_, "strict": bool(self.strict)}
        return {"type": "json_schema", "json_schema": body}


class TextConfig(_Strict):
    format: TextFormat = TextFormat(type="text")
    verbosity: str | None = None


class ResponsesRequest(_Strict):
    """POST /v1/responses. Unknown fields are ignored, as OpenAI does; known ones we do not do are refused by name."""

    model: str
    input: list[InputItem]  # a string is one user message
    instructions: str | None = None
    text: TextConfig = TextConfig()
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = Field(None, allow_inf_nan=False)
    top_p: float | None = Field(None, allow_inf_nan=False)
    seed: int | None = None
    top_k: int | None = None  # extensions, as on /v1/chat/completions
    min_p: float | None = Field(None, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, allow_inf_nan=False)
    ignore_eos: bool | None = None
    stream: bool = False
    store: bool | None = None  # accepted either way: nothing is stored
    metadata: dict[str, str] | None = None
    user: str | None = None
    # refused when they ask for something (REFUSED says why)
    previous_response_id: str | None = None
    conversation: str | dict | None = None
    background: bool | None = None
    include: list[str] | None = None
    reasoning: dict | None = None
    prompt: dict | None = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = None

    n: ClassVar[int] = 1  # one output a response

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, tools):
        for i, tool in enumerate(tools if isinstance(tools, list) else []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise Unsupported(f"tools[{i}].type", f"{kind!r} tools are not served; this server calls functions "
                                                      'only: {"type": "function", "name", "description", "parameters"}')
        return tools

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice(cls, choice):
        if isinstance(choice, dict) and choice.get("type") != "function":
            raise Unsupported("tool_choice", f"type {choice.get('type')!r} is not served; send none, auto, required "
                                             'or {"type": "function", "name": ...}')
        return choice

    @field_validator("tool_choice")
    @classmethod
    def _named_tool(cls, choice, info):
        names = {t.name for t in info.data.get("tools") or []}
        if isinstance(choice, ToolChoiceFunction) and choice.name not in names:
            raise ValueError(f"names function {choice.name!r}, which is not one of `tools` ({sorted(names)})")
        return choice

    @field_validator("input", mode="before")
    @classmethod
    def _text_items(cls, items):
        """A string as its user message; items and parts we cannot take refused by name before they are parsed."""
        if isinstance(items, str):
            if not items:
                raise ValueError("the input is empty")
            items = [{"type": "message", "role": "user", "content": items}]
        if isinstance(items, list) and not items:
            raise ValueError("the input has no items")
        for i, item in enumerate(items if isinstance(items, list) else []):
            if not isinstance(item, dict):
                raise ValueError(f"input[{i}] must be an item object: {', '.join(ITEM_KINDS)}")
            kind = _item_kind(item)
            if kind not in ITEM_KINDS:
                raise Unsupported(f"input[{i}].type", f"{kind!r} items are not served; this server takes "
                                                      f"{', '.join(ITEM_KINDS)} (stateless: no item references)")
            parts = item.get("content") if kind == "message" else item.get("output")
            for j, part in enumerate(parts if isinstance(parts, list) else []):
                part_kind = part.get("type") if isinstance(part, dict) else None
                if part_kind not in PART_KINDS:
                    raise Unsupported(f"input[{i}].{'content' if kind == 'message' else 'output'}[{j}].type",
                                      f"{part_kind!r} parts are not served: the model reads text; send "
                                      f"{' or '.join(PART_KINDS)}")
        return items

    @field_validator("input")
    @classmethod
    def _answers_follow_calls(cls, items):
        calls = set()
        for i, item in enumerate(items):
            if isinstance(item, FunctionCall):
                calls.add(item.call_id)
            elif isinstance(item, FunctionCallOutput) and item.call_id not in calls:
                raise ValueError(f"input[{i}]: function_call_output {item.call_id!r} answers no function_call item "
                                 "before it; send the call too (this server is stateless)")
        return items

    @model_validator(mode="after")
    def _refused(self):
        asked = {"previous_response_id": self.previous_response_id is not None,
                 "conversation": self.conversation is not None, "background": bool(self.background),
                 "include": bool(self.include), "prompt": self.prompt is not None,
                 "reasoning": any(v is not None for v in (self.reasoning or {}).values()),
                 "truncation": self.truncation == "auto", "top_logprobs": bool(self.top_logprobs),
                 "text.verbosity": self.text.verbosity is not None}
        for name, given in asked.items():
            if given:
                raise Unsupported(name, REFUSED[name])
        return self

    def to_params(self) -> SamplingParams:
        """The request's SamplingParams, with the chat endpoint's defaults (ParamError names SamplingParams' field:
        `api_name` gives the request's)."""
        names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "ignore_eos")
        given = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.max_output_tokens is not None:
            given["max_new_tokens"] = self.max_output_tokens
        return SamplingParams(**{**ENTRY_DEFAULTS["chat"], **given})

    @staticmethod
    def api_name(param: str) -> str:
        """This request's name for a chat request's (or SamplingParams') field."""
        return {"max_new_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
                "response_format": "text.format", "messages": "input", "prompt": "input"}.get(param, param)


# -- the request as a chat request -------------------------------------------------------------------------


class ChatForm(NamedTuple):
    """A Responses request in chat-completions shape: what tools.check_tools, tools.prompt_messages and
    grammar.spec_from_response_format take."""

    messages: list[dict]
    tools: list[dict] | None
    tool_choice: str | dict | None
    response_format: dict | None
    max_tokens: int | None


def to_chat(request: ResponsesRequest) -> ChatForm:
    """The request as chat's values. `instructions` and the system/developer messages that open the input become one
    system message; function_call items join the assistant message before them (one turn, several calls);
    function_call_output items become tool messages. ParamError (protocol.text) for text that is not valid Unicode."""
    messages = []
    if request.instructions is not None:
        messages.append({"role": "system", "content": checked_text(request.instructions, "instructions")})
    for item in request.input:
        last = messages[-1] if messages else None
        if isinstance(item, InputMessage):
            role = "system" if item.role == "developer" else item.role
            content = checked_text(item.joined(), "input")
            if role == "system" and last is not None and all(m["role"] == "system" for m in messages):
                last["content"] += "\n\n" + content
            else:
                messages.append({"role": role, "content": content})
        elif isinstance(item, FunctionCall):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": checked_text(item.arguments, "input")}}
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": checked_text(item.joined(), "input")})
    tools = None
    if request.tools is not None:
        tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                   "parameters": t.parameters or {"type": "object", "properties": {}},
                                                   "strict": bool(t.strict)}} for t in request.tools]
    choice = request.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        choice = {"type": "function", "function": {"name": choice.name}}
    return ChatForm(messages, tools, choice, request.text.format.as_response_format(), request.max_output_tokens)


# -- the response ------------------------------------------------------------------------------------------


def _usage(finished: Finished) -> dict:
    return {"input_tokens": finished.prompt_tokens, "output_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens,
            "input_tokens_details": {"cached_tokens": finished.cached_tokens, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}


def _status(finished: Finished) -> tuple[str, dict | None]:
    """The response's status and incomplete_details: cut at max_output_tokens (or the context's end) it is
    incomplete; cancelled (the server stopping) incomplete with no reason OpenAI names."""
    if finished.reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finished.reason == "cancelled":
        return "incomplete", {"reason": None}
    return "completed", None


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseBuilder:
    """The Response object of one request, whole (`whole`) or as its stream of typed events (`start`, `add`...,
    then `end` or `fail`). Items are sent one at a time: text goes to a message item, each call to a function_call
    item; a call after text closes the message, text after a call opens a new one."""

    def __init__(self, model_name: str, request: ResponsesRequest):
        self.model_name, self.request = model_name, request
        self.id, self.created_at = _id("resp"), now()
        params = request.to_params()
        self.temperature, self.top_p = params.temperature, params.top_p
        self.output: list[dict] = []  # streaming: the items so far (the last one open while `self.open`)
        self.open = False
        self.text = ""  # the open message's text
        self.calls = 0  # function_call items so far
        self.sequence = 0

    def response(self, status: str, output: list[dict], finished: Finished | None = None,
                 incomplete: dict | None = None, error: dict | None = None) -> dict:
        """The Response object, the request's settings echoed as OpenAI's object carries them."""
        request = self.request
        choice = request.tool_choice
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "completed_at": now() if status == "completed" else None, "error": error,
                "incomplete_details": incomplete, "model": self.model_name, "output": output,
                "usage": _usage(finished) if finished is not None else None,
                "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p,
                "parallel_tool_calls": request.parallel_tool_calls is not False,
                "tool_choice": choice.model_dump() if isinstance(choice, ToolChoiceFunction) else choice or "auto",
                "tools": [t.model_dump() for t in request.tools or []],
                "text": {"format": request.text.format.model_dump(by_alias=True, exclude_none=True)},
                "truncation": "disabled", "background": False, "previous_response_id": None,
                "metadata": request.metadata or {}, "user": request.user}

    def whole(self, text: str | None, tool_calls: list[dict], finished: Finished) -> dict:
        """The Response for a whole answer: `text` (None or "" for none) and `tool_calls` in chat's shape
        ({"id", "type", "function": {"name", "arguments"}}, as tools.Reply has them)."""
        status, incomplete = _status(finished)
        item_status = "completed" if status == "completed" else "incomplete"
        output = []
        if text or not tool_calls:
            output.append({"type": "message", "id": _id("msg"), "role": "assistant", "status": item_status,
                           "content": [_text_part(text or "")]})
        output += [{"type": "function_call", "id": _id("fc"), "call_id": call["id"], "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"], "status": item_status} for call in tool_calls]
        return self.response(status, output, finished, incomplete)

    # -- streaming: each call returns the SSE events it makes, in order

    def start(self) -> list[str]:
        snapshot = self.response("in_progress", [])
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def add(self, content: str, tool_calls: list[dict]) -> list[str]:
        """Text and chat's tool-call deltas (tools.ToolStream's push or finish; `piece.text, []` without tools)."""
        events = []
        if content:
            if not (self.open and self.output[-1]["type"] == "message"):
                events += self._close("completed") + self._open_message()
            self.text += content
            events.append(self._event("response.output_text.delta", **self._where(), content_index=0,
                                      delta=content, logprobs=[]))
        for delta in tool_calls:
            arguments = delta["function"].get("arguments") or ""
            if "id" in delta:  # a new call: its name and id come first
                events += self._close("completed")
                self.calls += 1
                self.output.append({"type": "function_call", "id": _id("fc"), "call_id": delta["id"],
                                    "name": delta["function"]["name"], "arguments": "", "status": "in_progress"})
                self.open = True
                events.append(self._event("response.output_item.added", output_index=len(self.output) - 1,
                                          item=self.output[-1]))
            if arguments:  # tools.ToolStream grows only its last call
                assert delta["index"] == self.calls - 1 and self.open and self.output[-1]["type"] == "function_call"
                self.output[-1]["arguments"] += arguments
                events.append(self._event("response.function_call_arguments.delta", **self._where(),
                                          delta=arguments))
        return events

    def end(self, finished: Finished) -> list[str]:
        """The last item closed and the response completed (or incomplete: cut at max_output_tokens)."""
        status, incomplete = _status(finished)
        events = [] if self.output else self._open_message()  # an empty answer is an empty message
        events += self._close("completed" if status == "completed" else "incomplete")
        response = self.response(status, self.output, finished, incomplete)
        return events + [self._event(f"response.{status}", response=response)]

    def fail(self, message: str) -> list[str]:
        """The generation failed: response.failed with the items so far (incomplete) and the error."""
        if self.open:
            self.output[-1]["status"] = "incomplete"
            if self.output[-1]["type"] == "message":
                self.output[-1]["content"] = [_text_part(self.text)]
        response = self.response("failed", self.output, error={"code": "server_error", "message": message})
        return [self._event("response.failed", response=response)]

    def _open_message(self) -> list[str]:
        self.output.append({"type": "message", "id": _id("msg"), "role": "assistant", "status": "in_progress",
                            "content": []})
        self.open, self.text = True, ""
        return [self._event("response.output_item.added", output_index=len(self.output) - 1, item=self.output[-1]),
                self._event("response.content_part.added", **self._where(), content_index=0, part=_text_part(""))]

    def _close(self, status: str) -> list[str]:
        if not self.open:
            return []
        item, events = self.output[-1], []
        if item["type"] == "message":
            item["content"] = [_text_part(self.text)]
            events += [self._event("response.output_text.done", **self._where(), content_index=0, text=self.text,
                                   logprobs=[]),
                       self._event("response.content_part.done", **self._where(), content_index=0,
                                   part=item["content"][0])]
        else:
            events.append(self._event("response.function_call_arguments.done", **self._where(),
                                      arguments=item["arguments"]))
        item["status"], self.open = status, False
        return events + [self._event("response.output_item.done", output_index=len(self.output) - 1, item=item)]

    def _where(self) -> dict:
        return {"item_id": self.output[-1]["id"], "output_index": len(self.output) - 1}

    def _event(self, kind: str, **fields) -> str:
        data = json.dumps({"type": kind, "sequence_number": self.sequence, **fields}, ensure_ascii=False)
        self.sequence += 1
        return f"event: {kind}\ndata: {data}\n\n"
