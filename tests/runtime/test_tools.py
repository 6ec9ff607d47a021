"""Tool calling (runtime/serving/tools.py) without a model: the format from the tokenizer, the tools in the prompt,
replies parsed whole and as streaming deltas that add up to the whole, and forced calls whose arguments validate."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from tokenizers import AddedToken

from runtime.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from runtime.serving import tools as T
from runtime.tokenizer import Tokenizer

from .conftest import END_OF_TURN, tiny_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Gets the current weather in a given location.",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": 'The city and state, e.g. "San Francisco, CA" or "Tokyo, JP"'},
        "unit": {"type": "string", "description": "The unit to return the temperature in.",
                 "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string"},
        "limit": {"type": "integer", "minimum": 1},
        "filters": {"type": "object", "properties": {"site": {"type": ["string", "null"]},
                                                     "safe": {"type": "boolean"}}, "required": ["safe"]},
        "langs": {"type": "array", "items": {"enum": ["en", "fr"]}}},
        "required": ["query", "filters"]}}}
FUNCTIONGEMMA_TOKENS = [t for pair in T.FUNCTIONGEMMA[1:4] for t in pair] + [T.FUNCTIONGEMMA[4]]
GEMMA4_TOKENS = [t for pair in T.GEMMA4[1:4] for t in pair] + [T.GEMMA4[4]]


def tokenizer_with(tokens) -> Tokenizer:
    raw = tiny_tokenizer()
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    return Tokenizer(raw)


@pytest.fixture(scope="module")
def formats():
    return {"gemma3": T.detect_format(Tokenizer(tiny_tokenizer()).token_id),
            "functiongemma": T.detect_format(tokenizer_with(FUNCTIONGEMMA_TOKENS).token_id),
            "gemma4": T.detect_format(tokenizer_with(GEMMA4_TOKENS).token_id)}


def test_the_format_comes_from_the_tokenizer(formats):
    assert {name: fmt.name for name, fmt in formats.items()} == {n: n for n in formats}
    assert formats["functiongemma"].end_tokens == ("<start_function_response>",)
    assert set(formats["gemma4"].ids) == set(GEMMA4_TOKENS)
    # a tokenizer with only some of the tokens has no native format
    assert T.detect_format(tokenizer_with(FUNCTIONGEMMA_TOKENS[:-1]).token_id).name == "gemma3"


# -- the request -------------------------------------------------------------------------------------------


def test_tools_and_tool_choice_are_checked():
    request = T.check_tools([WEATHER, SEARCH], {"type": "function", "function": {"name": "search"}})
    assert request.choice == "search" and request.names == {"get_current_weather", "search"} and request.active
    assert T.check_tools([WEATHER]).choice == "auto"
    assert not T.check_tools([WEATHER], "none").active and not T.check_tools(None).active
    bad = [([{"type": "function", "function": {"name": "has space"}}], None, "tools[0]"),
           ([{"type": "retrieval"}], None, "tools[0]"),
           ([WEATHER, WEATHER], None, "same name"),
           ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "parameters"),
           ([WEATHER], "sometimes", "tool_choice"),
           ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
           ([], "required", "tool_choice")]
    for tools, choice, words in bad:
        with pytest.raises(T.ToolError, match=re.escape(words)):
            T.check_tools(tools, choice)


# -- the prompt --------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Tokyo and Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_current_weather", "arguments": '{"location": "Tokyo, JP"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_current_weather", "arguments": '{"location": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 15, "weather": "sunny"}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    {"role": "user", "content": "Thanks. And Rome?"},
]


def test_gemma3_prompt_folds_tools_into_the_turns(formats):
    """Gemma 3's template ignores tools: the declarations join the system text (the first user turn), calls are
    the model's JSON, results a user turn; the roles still alternate (the template refuses otherwise)."""
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE)
    assert not T.template_renders_tools(template)
    request = T.check_tools([WEATHER], "auto")
    messages, variables = T.prompt_messages(formats["gemma3"], CONVERSATION, request, native_template=False)
    assert variables == {}
    prompt = template.render(messages)
    assert prompt.startswith("<bos><start_of_turn>user\nBe brief.\n\nYou have access to functions.")
    declarations = formats["gemma3"].declarations(request.functions)
    assert '"name": "get_current_weather"' in declarations and '"enum": [' in declarations
    assert f"Be brief.\n\n{declarations}\n\nWeather in Tokyo and Paris?<end_of_turn>\n" in prompt
    assert ('<start_of_turn>model\n{"name": "get_current_weather", "parameters": {"location": "Tokyo, JP"}}\n'
            '{"name": "get_current_weather", "parameters": {"location": "Paris", "unit": "celsius"}}<end_of_turn>'
            in prompt)
    # the results and the next question: one user turn
    assert prompt.endswith('<start_of_turn>user\n```tool_output\n{"temperature": 15, "weather": "sunny"}\n```\n'
                           "```tool_output\nrain\n```\nThanks. And Rome?<end_of_turn>\n<start_of_turn>model\n")
    # tool_choice "none": no tools in the prompt, the earlier calls still shown
    plain, _ = T.prompt_messages(formats["gemma3"], CONVERSATION, T.check_tools([WEATHER], "none"), False)
    assert "You have access" not in template.render(plain) and '"Tokyo, JP"' in template.render(plain)


def test_native_declarations_as_functiongemma_writes_them(formats):
    """FunctionGemma's own example (its formatting guide): declaration, call and response."""
    fmt = formats["functiongemma"]
    function = T.check_tools([WEATHER]).functions
    assert fmt.declarations(function) == (
        "<start_function_declaration>declaration:get_current_weather{description:<escape>Gets the current weather "
        "in a given location.<escape>,parameters:{properties:{location:{description:<escape>The city and state, e.g."
        ' "San Francisco, CA" or "Tokyo, JP"<escape>,type:<escape>STRING<escape>},unit:{description:<escape>The unit'
        " to return the temperature in.<escape>,enum:[<escape>celsius<escape>,<escape>fahrenheit<escape>],type:"
        "<escape>STRING<escape>}},required:[<escape>location<escape>],type:<escape>OBJECT<escape>}}"
        "<end_function_declaration>")
    assert fmt.call("get_current_weather", {"location": "Tokyo, Japan"}) == (
        "<start_function_call>call:get_current_weather{location:<escape>Tokyo, Japan<escape>}<end_function_call>")
    assert fmt.result("get_current_weather", '{"weather": "sunny", "temperature": 15}') == (
        "<start_function_response>response:get_current_weather{temperature:15,weather:<escape>sunny<escape>}"
        "<end_function_response>")
    assert fmt.result("f", "plain text") == "<start_function_response>response:f{value:<escape>plain text<escape>}" \
                                           "<end_function_response>"


NATIVE_TEMPLATE = """{{ bos_token }}{% if tools %}<start_of_turn>developer
{% for tool in tools %}[{{ tool.function.name }}]{% endfor %}<end_of_turn>
{% endif %}{% for m in messages %}<start_of_turn>{{ m.role }}
{{ m.content or '' }}{% for c in m.tool_calls or [] %}({{ c.function.name }}:{{ c.function.arguments.location }}){% endfor %}
{% for r in m.tool_responses or [] %}<{{ r.name }}={{ r.response }}>{% endfor %}{% if m.name %}<{{ m.name }}>{% endif %}<end_of_turn>
{% endfor %}"""


def test_native_templates_get_the_tools_and_the_arguments_as_dicts(formats):
    template = ChatTemplate(NATIVE_TEMPLATE)
    assert T.template_renders_tools(template)
    request = T.check_tools([WEATHER, SEARCH])
    messages, variables = T.prompt_messages(formats["functiongemma"], CONVERSATION, request, native_template=True)
    assert [t["function"]["name"] for t in variables["tools"]] == ["get_current_weather", "search"]
    prompt = template.render(messages, **variables)
    assert "[get_current_weather][search]" in prompt and "(get_current_weather:Tokyo, JP)" in prompt
    assert "<start_of_turn>tool\nrain<get_current_weather>" in prompt  # the result names its function
    # Gemma 4's template reads results from the calling message's tool_responses
    messages, _ = T.prompt_messages(formats["gemma4"], CONVERSATION, request, native_template=True)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["tool_responses"] == [
        {"name": "get_current_weather", "response": {"temperature": 15, "weather": "sunny"}},
        {"name": "get_current_weather", "response": "rain"}]


def test_arguments_that_are_not_json_are_refused(formats):
    broken = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "search", "arguments": "{oops"}}]}]
    with pytest.raises(T.ToolError, match="messages: the arguments of tool call 'c' are not JSON"):
        T.prompt_messages(formats["gemma3"], broken, T.check_tools([SEARCH]), native_template=False)


# -- the reply ---------------------------------------------------------------------------------------------

REQUEST = T.check_tools([WEATHER, SEARCH])
# (format, reply text, expected content, expected calls as (name, arguments dict or raw text))
REPLIES = [
    ("gemma4", '<|tool_call>call:get_current_weather{location:<|"|>San Francisco<|"|>,unit:<|"|>celsius<|"|>}'
               "<tool_call|>", None, [("get_current_weather", {"location": "San Francisco", "unit": "celsius"})]),
    ("gemma4", 'Let me look. <|tool_call>call:search{filters:{safe:true,site:null},langs:[<|"|>en<|"|>,<|"|>fr'
               '<|"|>],limit:3,query:<|"|>a, {b} [c]: d<|"|>}<tool_call|><|tool_call>call:get_current_weather'
               '{location:<|"|>Rome<|"|>}<tool_call|>',
     "Let me look. ", [("search", {"filters": {"safe": True, "site": None}, "langs": ["en", "fr"], "limit": 3,
                                   "query": "a, {b} [c]: d"}), ("get_current_weather", {"location": "Rome"})]),
    ("gemma4", "<|tool_call>call:unknown_fn{a:1}<tool_call|>", "<|tool_call>call:unknown_fn{a:1}<tool_call|>", []),
    ("gemma4", "<|tool_call>call:search{query:<|\"|>unterminated}<tool_call|> ok",
     "<|tool_call>call:search{query:<|\"|>unterminated}<tool_call|> ok", []),
    ("gemma4", "No tools needed: it is 4.", "No tools needed: it is 4.", []),
    ("functiongemma", "<start_function_call>call:get_current_weather{location:<escape>Tokyo, Japan<escape>}"
                      "<end_function_call>", None, [("get_current_weather", {"location": "Tokyo, Japan"})]),
    ("functiongemma", "<start_function_call>call:search{filters:{safe:false},query:<escape>x<escape>,limit:2.5}",
     None, [("search", {"filters": {"safe": False}, "query": "x", "limit": 2.5})]),  # cut before its end token
    ("gemma3", '{"name": "get_current_weather", "parameters": {"location": "Tokyo", "unit": "celsius"}}', None,
     [("get_current_weather", '{"location": "Tokyo", "unit": "celsius"}')]),
    ("gemma3", '```json\n{"name": "search", "arguments": {"query": "q \\" }", "filters": {"safe": true}}}\n```\n',
     None, [("search", '{"query": "q \\" }", "filters": {"safe": true}}')]),
    ("gemma3", '  {"parameters": {"location": "Oslo"}, "name": "get_current_weather"} Done.', " Done.",
     [("get_current_weather", '{"location": "Oslo"}')]),
    ("gemma3", '{"name": "get_current_weather"}', None, [("get_current_weather", "{}")]),
    ("gemma3", '{"name": "get_current_weather", "parameters": {"location": "Ber', None,
     [("get_current_weather", '{"location": "Ber')]),  # cut by max_tokens: the arguments as far as they came
    ("gemma3", '{"name": "not_a_tool", "parameters": {}}', '{"name": "not_a_tool", "parameters": {}}', []),
    ("gemma3", '{"city": "Paris"}', '{"city": "Paris"}', []),
    ("gemma3", "The capital of France is Paris.", "The capital of France is Paris.", []),
    ("gemma3", "```python\nprint(1)\n```", "```python\nprint(1)\n```", []),
    ("gemma3", "   ", None, []),
]


@pytest.mark.parametrize("name, text, content, calls", REPLIES)
def test_replies_parse_and_stream_to_the_same(formats, name, text, content, calls):
    fmt = formats[name]
    reply = T.parse_reply(fmt, text, REQUEST)
    assert reply.content == content
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in reply.tool_calls]
    expected = [(n, a if isinstance(a, str) else json.dumps(a)) for n, a in calls]
    assert [(n, a if fmt.name == "gemma3" else json.loads(a)) for n, a in got] == \
           [(n, a if fmt.name == "gemma3" else json.loads(a)) for n, a in expected]
    assert reply.finish_reason == ("tool_calls" if calls else None)
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in reply.tool_calls)
    rng = np.random.default_rng(len(text))
    for chunks in (list(text), split_randomly(text, rng), split_randomly(text, rng)):
        check_stream(fmt, chunks, reply)


def split_randomly(text: str, rng) -> list[str]:
    cuts = sorted(rng.choice(np.arange(1, max(len(text), 2)), size=min(len(text) // 3, 8), replace=False))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def check_stream(fmt, chunks, whole: T.Reply):
    """Deltas sent as the chunks come add up to the whole reply: content, each call's name once with its id
    and type, arguments in pieces."""
    stream = T.ToolStream(fmt, REQUEST)
    content, calls = "", {}
    for delta_content, deltas in [stream.push(c) for c in chunks] + [stream.finish()]:
        content += delta_content
        for delta in deltas:
            if delta["index"] not in calls:
                assert delta["index"] == len(calls) and delta["type"] == "function" and delta["id"]
                calls[delta["index"]] = {"id": delta["id"], "name": delta["function"]["name"], "arguments": ""}
            else:
                assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
            calls[delta["index"]]["arguments"] += delta["function"]["arguments"]
    assert content == (whole.content or "")
    reply = stream.reply()
    assert [(c["id"], c["name"], c["arguments"]) for c in calls.values()] == \
           [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in reply.tool_calls]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in reply.tool_calls] == \
           [(c["function"]["name"], c["function"]["arguments"]) for c in whole.tool_calls]


def test_a_json_call_streams_its_name_before_its_end(formats):
    stream = T.ToolStream(formats["gemma3"], REQUEST)
    assert stream.push('{"name": "search", "parameters": {"query": "ca') == ("", [
        {"index": 0, "id": stream.ids[0], "type": "function",
         "function": {"name": "search", "arguments": '{"query": "ca'}}])
    assert stream.push('ts"}}') == ("", [{"index": 0, "function": {"arguments": 'ts"}'}}])


def test_plain_text_streams_as_it_comes(formats):
    stream = T.ToolStream(formats["gemma3"], REQUEST)
    assert stream.push("  ") == ("", [])  # whitespace alone waits
    assert stream.push("Hel") == ("  Hel", [])
    assert stream.push("lo") == ("lo", [])
    native = T.ToolStream(formats["gemma4"], REQUEST)
    assert native.push("Sure <|tool_call>call:sea") == ("Sure ", [])  # the call waits for its end token


# -- forced calls ------------------------------------------------------------------------------------------


def test_auto_and_none_force_nothing(formats):
    for fmt in formats.values():
        assert T.forced_spec(fmt, T.check_tools([WEATHER], "auto")) is None
        assert T.forced_spec(fmt, T.check_tools([WEATHER], "none")) is None


@pytest.mark.parametrize("name", ["gemma3", "functiongemma", "gemma4"])
@pytest.mark.parametrize("choice", ["required", "search"])
def test_forced_calls_parse_and_validate(name, choice):
    """Random walks in the forced grammar are calls (of the named function) whose arguments validate against
    its parameters."""
    G = pytest.importorskip("runtime.serving.grammar")
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    from .test_grammar import closers, walk

    tokenizer = {"gemma3": Tokenizer(tiny_tokenizer()), "functiongemma": tokenizer_with(FUNCTIONGEMMA_TOKENS),
                 "gemma4": tokenizer_with(GEMMA4_TOKENS)}[name]
    fmt = T.detect_format(tokenizer.token_id)
    request = T.check_tools([WEATHER, SEARCH], choice if choice == "required" else
                            {"type": "function", "function": {"name": choice}})
    spec = T.forced_spec(fmt, request)
    assert spec.param == "tool_choice"
    info = G.TokenizerInfo(tokenizer, (1, END_OF_TURN), tokenizer.vocab_size)
    grammar = G.compile(spec, info)
    parameters = {f.name: f.parameters for f in request.functions}
    prefer = closers(tokenizer) | set(getattr(fmt, "ids", {}).values())
    rng, seen = np.random.default_rng(3), set()
    for _ in range(8):
        text = tokenizer.decode(walk(grammar, info, rng, prefer=prefer), skip_special_tokens=False)
        reply = T.parse_reply(fmt, text, request)
        assert reply.tool_calls and reply.content is None, text
        for call in reply.tool_calls:
            seen.add(call["function"]["name"])
            jsonschema.validate(json.loads(call["function"]["arguments"]), parameters[call["function"]["name"]])
    assert seen <= ({"search"} if choice == "search" else request.names)
