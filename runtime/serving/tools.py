"""Tool calling for Gemma: the request's `tools` rendered into the prompt, the reply parsed into OpenAI
`tool_calls` (whole, or as streaming deltas), and the grammar that forces a call.

Three formats; `detect_format` picks one from the artifact's tokenizer (its special tokens):

    gemma4         <|tool_call> and <tool_call|> are tokens. Reply: <|tool_call>call:NAME{city:<|"|>Paris<|"|>,days:3}
                   <tool_call|>, strings between <|"|> tokens, keys bare (Gemma 4's chat template; vLLM's gemma4
                   parser). Tools: <|tool>declaration:NAME{...}<tool|> in the system turn.
    functiongemma  <start_function_call> is a token: the same syntax with <start_function_call>, <end_function_call>
                   and <escape> (FunctionGemma's template; vLLM's functiongemma parser). Its template ends a call
                   turn with <start_function_response>: an extra end token while generating.
    gemma3         neither (Gemma 3 has no tool tokens): the tools as JSON in the prompt and the call as JSON in the
                   reply, {"name": ..., "parameters": {...}}, as Google's function-calling guide for Gemma writes it.

Whether the artifact's chat template renders `tools` itself is the other half (`template_renders_tools`, which
renders a probe): FunctionGemma's and Gemma 4's do, and get the tools and the messages as they are; Gemma 3's
ignores them, and `prompt_messages` folds the tools, the calls and their results into the text of the turns.

The native formats' tokens are special tokens: decode the reply with skip_special_tokens=False to parse it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .grammar import GrammarSpec
from .tool_parser import Scan, scan_json, scan_native

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's function names (and the dots Gemma 4's parser takes)
GEMMA3_PREAMBLE = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the format of\n"
    '{"name": function name, "parameters": dictionary of argument name and its value}\n\n'
    "You SHOULD NOT include any other text in the response if you call a function\n"
)


class ToolError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class Function:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_tool(self) -> dict:
        """The OpenAI tool dict chat templates take."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolRequest:
    functions: tuple[Function, ...]
    choice: str  # "none", "auto", "required", or the name of the function that must be called

    @property
    def names(self) -> set[str]:
        return {f.name for f in self.functions}

    @property
    def active(self) -> bool:
        """The tools go into the prompt and the reply is parsed for calls."""
        return bool(self.functions) and self.choice != "none"


def check_tools(tools, tool_choice=None) -> ToolRequest:
    """The request's `tools` and `tool_choice`, checked: ToolError names the field and what it takes."""
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise ToolError("tools", "must be a list of {\"type\": \"function\", \"function\": {...}}")
    functions = []
    for i, tool in enumerate(tools):
        body = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not NAME.match(body["name"]):
            raise ToolError(f"tools[{i}]", 'must be {"type": "function", "function": {"name": a-z, A-Z, 0-9, _ . - '
                                          'up to 64, "description", "parameters": a JSON schema}}')
        parameters = body.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ToolError(f"tools[{i}].function.parameters", "must be a JSON schema object")
        functions.append(Function(body["name"], body.get("description") or "", parameters))
    if len({f.name for f in functions}) != len(functions):
        raise ToolError("tools", "two functions have the same name")
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in {f.name for f in functions}:
            raise ToolError("tool_choice", f"names no function of `tools`: {choice!r}")
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise ToolError("tool_choice", 'takes "none", "auto", "required" or {"type": "function", "function": '
                                       '{"name": ...}}')
    if choice == "required" and not functions:
        raise ToolError("tool_choice", '"required" needs at least one function in `tools`')
    return ToolRequest(tuple(functions), choice)


# -- the formats ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gemma3Json:
    """The call as JSON in the reply (Gemma 3 has no tool tokens)."""

    name: str = "gemma3"
    end_tokens: tuple[str, ...] = ()

    def declarations(self, functions) -> str:
        listed = [{"name": f.name, "description": f.description, "parameters": f.parameters} for f in functions]
        return GEMMA3_PREAMBLE + json.dumps(listed, indent=2, ensure_ascii=False)

    def call(self, name: str, arguments: dict) -> str:
        return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)

    def result(self, name: str, content: str) -> str:
        return f"```tool_output\n{content}\n```"


@dataclass(frozen=True)
class Native:
    """Gemma 4's and FunctionGemma's syntax: call:NAME{key:value,...} between call tokens, strings between quote
    tokens. `ids` maps each of the tokens to its id (the forced-call grammar names tokens by id)."""

    name: str
    declare: tuple[str, str]
    call_tokens: tuple[str, str]
    response: tuple[str, str]
    quote: str
    end_tokens: tuple[str, ...]
    ids: dict = field(default_factory=dict, compare=False)

    def value(self, value) -> str:
        """A Python value in the format (keys bare, sorted as the templates' dictsort writes them)."""
        if isinstance(value, str):
            return self.quote + value + self.quote
        if isinstance(value, bool):
            return "true" if value else "false"
        if value is None:
            return "null"
        if isinstance(value, dict):
            return "{" + ",".join(f"{k}:{self.value(v)}" for k, v in sorted(value.items())) + "}"
        if isinstance(value, (list, tuple)):
            return "[" + ",".join(self.value(v) for v in value) + "]"
        return json.dumps(value)

    def declarations(self, functions) -> str:
        return "".join(f"{self.declare[0]}declaration:{f.name}"
                       f"{self.value({'description': f.description, 'parameters': _upper_types(f.parameters)})}"
                       f"{self.declare[1]}" for f in functions)

    def call(self, name: str, arguments: dict) -> str:
        return f"{self.call_tokens[0]}call:{name}{self.value(arguments)}{self.call_tokens[1]}"

    def result(self, name: str, content: str) -> str:
        try:
            value = json.loads(content)
        except json.JSONDecodeError:
            value = content
        body = value if isinstance(value, dict) else {"value": value}
        return f"{self.response[0]}response:{name}{self.value(body)}{self.response[1]}"


def _upper_types(schema):
    """JSON schema types in capitals, as the templates declare them (STRING, OBJECT...)."""
    if isinstance(schema, list):
        return [_upper_types(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: (v.upper() if k == "type" and isinstance(v, str) else
                [t.upper() for t in v] if k == "type" and isinstance(v, list) else _upper_types(v))
            for k, v in schema.items()}


GEMMA4 = ("gemma4", ("<|tool>", "<tool|>"), ("<|tool_call>", "<tool_call|>"), ("<|tool_response>", "<tool_response|>"),
          '<|"|>', ("<|tool_response>",))
FUNCTIONGEMMA = ("functiongemma", ("<start_function_declaration>", "<end_function_declaration>"),
                 ("<start_function_call>", "<end_function_call>"),
                 ("<start_function_response>", "<end_function_response>"), "<escape>", ("<start_function_response>",))


def detect_format(token_id: Callable[[str], int | None]):
    """The artifact's tool format, from its tokenizer: `token_id(text)` is the id of a token or None (the runtime
    Tokenizer's token_id). A native format needs all its tokens."""
    for name, declare, call, response, quote, end_tokens in (GEMMA4, FUNCTIONGEMMA):
        tokens = (*declare, *call, *response, quote)
        ids = {t: token_id(t) for t in tokens}
        if all(i is not None for i in ids.values()):
            return Native(name, declare, call, response, quote, end_tokens, ids)
    return Gemma3Json()


PROBE = Function("gemma_deploy_probe_fn", "probe", {"type": "object", "properties": {}})


def template_renders_tools(template) -> bool:
    """Whether a chat template (runtime.chat.ChatTemplate) writes `tools` into the prompt itself."""
    try:
        text = template.render([{"role": "user", "content": "hi"}], tools=[PROBE.as_tool()])
    except ValueError:
        return False
    return PROBE.name in text


# -- the prompt ------------------------------------------------------------------------------------------------


def prompt_messages(fmt, messages: list[dict], request: ToolRequest, native_template: bool) -> tuple[list[dict], dict]:
    """The messages and extra template variables for a conversation with tools. `messages` are OpenAI's (with
    assistant `tool_calls`, and `tool` messages carrying `tool_call_id` and `content`). A native template gets
    `tools` and the calls' arguments as dicts; otherwise the tools, calls and results become text: the
    declarations join the system message, a call is the assistant's text, results are a user turn."""
    names = _call_names(messages)
    if not request.active:
        return _merge_user_turns([_plain(m, fmt, names) for m in messages]), {}
    if native_template:
        tools = [f.as_tool() for f in request.functions]
        if fmt.name == "gemma4":  # its template reads results from the assistant message's tool_responses
            return _gemma4_messages(messages, names), {"tools": tools}
        return [_with_arguments(m, names) for m in messages], {"tools": tools}
    out = [_plain(m, fmt, names) for m in messages]
    declarations = fmt.declarations(request.functions)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + declarations}
    else:
        out.insert(0, {"role": "system", "content": declarations})
    return _merge_user_turns(out), {}


def _call_names(messages) -> dict[str, str]:
    """tool_call_id -> function name, from the assistant messages' calls."""
    return {call.get("id"): call["function"]["name"] for m in messages for call in (m.get("tool_calls") or [])}


def _arguments(call: dict) -> dict:
    arguments = call["function"].get("arguments") or "{}"
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        raise ToolError("messages", f"the arguments of tool call {call.get('id')!r} are not JSON: {arguments!r}")


def _with_arguments(message: dict, names: dict) -> dict:
    out = dict(message)
    if message.get("tool_calls"):
        out["tool_calls"] = [{**c, "function": {"name": c["function"]["name"], "arguments": _arguments(c)}}
                             for c in message["tool_calls"]]
    if message["role"] == "tool":
        out["name"] = names.get(message.get("tool_call_id"), message.get("name", "unknown"))
    return out


def _gemma4_messages(messages, names) -> list[dict]:
    out = []
    for message in messages:
        if message["role"] == "tool" and out and out[-1]["role"] == "assistant":
            name = names.get(message.get("tool_call_id"), "unknown")
            try:
                response = json.loads(message.get("content") or "")
            except json.JSONDecodeError:
                response = message.get("content")
            out[-1] = {**out[-1], "tool_responses": [*out[-1].get("tool_responses", []),
                                                     {"name": name, "response": response}]}
        else:
            out.append(_with_arguments(message, names))
    return out


def _plain(message: dict, fmt, names: dict) -> dict:
    """A message as text only."""
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content)
    if message["role"] == "tool":
        name = names.get(message.get("tool_call_id"), "unknown")
        return {"role": "user", "content": fmt.result(name, content)}
    calls = [fmt.call(c["function"]["name"], _arguments(c)) for c in message.get("tool_calls") or []]
    return {"role": message["role"], "content": "\n".join([content] * bool(content) + calls)}


def _merge_user_turns(messages) -> list[dict]:
    """Consecutive user messages (several tool results) as one turn: Gemma's templates alternate roles."""
    out = []
    for message in messages:
        if out and message["role"] == out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + message["content"]}
        else:
            out.append(message)
    return out


# -- the reply ------------------------------------------------------------------------------------------------


def scan(fmt, text: str, names: set[str], final: bool) -> Scan:
    if isinstance(fmt, Native):
        return scan_native(text, fmt.call_tokens, fmt.quote, names, final)
    return scan_json(text, names, final)


@dataclass
class Reply:
    content: str | None
    tool_calls: list[dict]

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason "tool_calls" when the reply called a function, else None (keep the stop's)."""
        return "tool_calls" if self.tool_calls else None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_reply(fmt, text: str, request: ToolRequest) -> Reply:
    """A whole reply: its content (None when only whitespace is left) and its tool calls."""
    stream = ToolStream(fmt, request)
    stream.push(text)
    stream.finish()
    return stream.reply()


class ToolStream:
    """A reply as it streams: `push(text)` and `finish()` return the content and the OpenAI `delta.tool_calls`
    that became final ({"index", "id", "type", "function": {"name", "arguments"}} once a call's name is known,
    then {"index", "function": {"arguments": more}}); `reply()` is what they add up to. Content is sent once it is
    more than whitespace."""

    def __init__(self, fmt, request: ToolRequest):
        self.fmt, self.names = fmt, request.names
        self.text, self.content_sent, self.ids, self.arguments_sent = "", 0, [], []
        self.last = Scan()

    def push(self, text: str) -> tuple[str, list[dict]]:
        self.text += text
        return self._send(scan(self.fmt, self.text, self.names, final=False))

    def finish(self) -> tuple[str, list[dict]]:
        return self._send(scan(self.fmt, self.text, self.names, final=True))

    def _send(self, now: Scan) -> tuple[str, list[dict]]:
        self.last = now
        content = ""
        if now.content.strip():
            content, self.content_sent = now.content[self.content_sent:], len(now.content)
        deltas = []
        for index, (name, arguments, _) in enumerate(now.calls):
            if index == len(self.ids):
                self.ids.append(new_call_id())
                self.arguments_sent.append(len(arguments))
                deltas.append({"index": index, "id": self.ids[index], "type": "function",
                               "function": {"name": name, "arguments": arguments}})
            elif len(arguments) > self.arguments_sent[index]:
                deltas.append({"index": index, "function": {"arguments": arguments[self.arguments_sent[index]:]}})
                self.arguments_sent[index] = len(arguments)
        return content, deltas

    def reply(self) -> Reply:
        calls = [{"id": i, "type": "function", "function": {"name": name, "arguments": arguments}}
                 for i, (name, arguments, _) in zip(self.ids, self.last.calls)]
        return Reply(self.last.content if self.last.content.strip() else None, calls)


# -- the grammar that forces a call ----------------------------------------------------------------------------


def forced_spec(fmt, request: ToolRequest) -> GrammarSpec | None:
    """For tool_choice "required" or a named function: the grammar the reply must follow, a call whose arguments
    follow the function's parameters (None for "auto" and "none")."""
    if request.choice in ("auto", "none") or not request.functions:
        return None
    functions = [f for f in request.functions if request.choice in ("required", f.name)]
    if isinstance(fmt, Native):
        from .tool_grammar import native_call_grammar

        return GrammarSpec("grammar", native_call_grammar(fmt, functions, several=request.choice == "required"),
                           param="tool_choice")
    calls = [{"type": "object", "properties": {"name": {"const": f.name}, "parameters": f.parameters},
              "required": ["name", "parameters"], "additionalProperties": False} for f in functions]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return GrammarSpec.json_schema(schema, strict=False, param="tool_choice")
