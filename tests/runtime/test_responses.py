"""The Responses API (runtime/serving/responses.py) without a model: requests typed and refused by name, turned into
the chat path's values (rendered to the same prompt as the chat request they mean), and the Response object and its
stream events read back by the official openai client, its models and an ASGI stub of the test's own."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import TypeAdapter, ValidationError

from runtime.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from runtime.params import ParamError
from runtime.serving import grammar as G
from runtime.serving import tools as T
from runtime.serving.protocol import Unsupported
from runtime.serving.responses import ResponseBuilder, ResponsesRequest, to_chat
from runtime.serving.scheduler import Finished

from .test_tools import CONVERSATION, SEARCH, WEATHER

openai = pytest.importorskip("openai")
from openai.types.responses import Response, ResponseStreamEvent  # noqa: E402

GEMMA3 = T.Gemma3Json()
EVENTS = TypeAdapter(ResponseStreamEvent)


def flat(tool: dict) -> dict:
    """A chat tool in the Responses API's flat shape."""
    return {"type": "function", **tool["function"]}


def request(**fields) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "gemma", "input": "Hi", **fields})


# the chat conversation of test_tools, as Responses items
ITEMS = [
    {"role": "developer", "content": "Be brief."},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Tokyo and Paris?"}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_current_weather",
     "arguments": '{"location": "Tokyo, JP"}', "id": "fc_1", "status": "completed"},
    {"type": "function_call", "call_id": "call_2", "name": "get_current_weather",
     "arguments": '{"location": "Paris", "unit": "celsius"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": '{"temperature": 15, "weather": "sunny"}'},
    {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "rain"}]},
    {"role": "user", "content": "Thanks. And Rome?"},
]


# -- the request ---------------------------------------------------------------------------------------------


def test_items_become_the_chat_conversation_and_render_the_same_prompt():
    body = request(input=ITEMS, tools=[flat(WEATHER)], tool_choice="auto", max_output_tokens=50)
    chat = to_chat(body)
    assert chat.messages == CONVERSATION
    assert chat.tool_choice == "auto" and chat.max_tokens == 50 and chat.response_format is None
    tools = T.check_tools(chat.tools, chat.tool_choice)
    assert tools == T.check_tools([WEATHER], "auto")
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE)
    ours, variables = T.prompt_messages(GEMMA3, chat.messages, tools, native_template=False)
    theirs, _ = T.prompt_messages(GEMMA3, CONVERSATION, T.check_tools([WEATHER], "auto"), native_template=False)
    assert variables == {} and template.render(ours) == template.render(theirs)


def test_instructions_open_the_conversation_and_a_string_is_one_user_message():
    chat = to_chat(request(instructions="Answer in French.", input=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Bonjour", "annotations": []}],
         "id": "msg_1", "status": "completed"},
        {"type": "function_call", "call_id": "c", "name": "search", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "nothing"}]))
    assert chat.messages == [
        {"role": "system", "content": "Answer in French.\n\nBe brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "nothing"}]
    assert to_chat(request(input="Hello")).messages == [{"role": "user", "content": "Hello"}]
    assert to_chat(request()).tools is None


def test_text_formats_give_the_grammar_specs_of_chat_response_formats():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    cases = [({"type": "json_schema", "name": "city", "schema": schema, "strict": True},
              {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}),
             ({"type": "json_object"}, {"type": "json_object"}),
             ({"type": "text"}, {"type": "text"})]
    for fmt, chat_format in cases:
        converted = to_chat(request(text={"format": fmt})).response_format
        assert G.spec_from_response_format(converted) == G.spec_from_response_format(chat_format)
    spec = G.spec_from_response_format(to_chat(request(text={"format": cases[0][0]})).response_format)
    assert spec.kind == "json_schema" and json.loads(spec.text) == schema and spec.strict
    assert to_chat(request()).response_format is None


def test_tools_and_a_named_choice_become_chat_shapes():
    chat = to_chat(request(tools=[flat(WEATHER), flat(SEARCH)], tool_choice={"type": "function", "name": "search"}))
    assert T.check_tools(chat.tools, chat.tool_choice) == T.check_tools(
        [WEATHER, SEARCH], {"type": "function", "function": {"name": "search"}})
    assert T.check_tools(*to_chat(request(tools=[flat(SEARCH)], tool_choice="required"))[1:3]).choice == "required"


def test_sampling_takes_the_chat_defaults_and_names_responses_fields():
    params = request().to_params()
    assert (params.temperature, params.max_new_tokens, params.top_p) == (1.0, None, 1.0)
    params = request(temperature=0.0, top_p=0.5, max_output_tokens=7, seed=3, top_k=4).to_params()
    assert (params.temperature, params.top_p, params.max_new_tokens, params.seed, params.top_k) == (0.0, 0.5, 7, 3, 4)
    for fields, name in (({"max_output_tokens": 0}, "max_output_tokens"), ({"temperature": 5.0}, "temperature")):
        with pytest.raises(ParamError) as error:
            request(**fields).to_params()
        assert ResponsesRequest.api_name(error.value.param) == name
    assert ResponsesRequest.api_name("response_format") == "text.format"
    assert ResponsesRequest.n == 1


REFUSED = [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
    ({"conversation": "conv_1"}, "conversation", "keeps no conversations"),
    ({"background": True}, "background", "poll"),
    ({"include": ["message.output_text.logprobs"]}, "include", "output text"),
    ({"reasoning": {"effort": "low"}}, "reasoning", "reasoning"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "instructions"),
    ({"truncation": "auto"}, "truncation", "disabled"),
    ({"top_logprobs": 3}, "top_logprobs", "chat/completions"),
    ({"text": {"format": {"type": "text"}, "verbosity": "low"}}, "text.verbosity", "instructions"),
    ({"tools": [flat(WEATHER), {"type": "web_search"}]}, "tools[1].type", "'web_search' tools"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice", "'web_search_preview'"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type", "'reasoning' items"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "no item references"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "see"},
                                             {"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[1].type", "reads text"),
]


@pytest.mark.parametrize("fields, param, words", REFUSED)
def test_what_is_not_served_is_refused_by_name(fields, param, words):
    """The app turns an Unsupported cause into OpenAI's error naming `param` (app.py's _validation_error)."""
    with pytest.raises(ValidationError) as error:
        request(**fields)
    cause = error.value.errors()[0]["ctx"]["error"]
    assert isinstance(cause, Unsupported) and cause.param == param and words in str(cause)


def test_accepted_settings_ask_for_nothing_more():
    body = request(store=True, parallel_tool_calls=False, metadata={"k": "v"}, user="u", include=[],
                   reasoning={"effort": None}, truncation="disabled", background=False, top_logprobs=0,
                   service_tier="auto", stream_options={"include_obfuscation": False})
    assert body.store and body.parallel_tool_calls is False


BAD = [
    ({"temperature": "1"}, ("temperature",), "valid number"),  # strict JSON types, as protocol.py's
    ({"temperature": float("nan")}, ("temperature",), "finite"),
    ({"max_output_tokens": True}, ("max_output_tokens",), "valid integer"),
    ({"input": ""}, ("input",), "empty"),
    ({"input": []}, ("input",), "no items"),
    ({"input": ["Hi"]}, ("input",), "item object"),
    ({"input": [{"role": "tool", "content": "x"}]}, ("input", 0, "message", "role"), "'user'"),
    ({"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]}, ("input",), "answers no"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]},
     ("input", 0, "function_call", "arguments"), "JSON"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, ("text", "format"), '"name"'),
    ({"text": {"format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}}, ("text", "format"),
     '"schema"'),  # chat's nesting, sent to the Responses API
    ({"text": {"format": {"type": "grammar"}}}, ("text", "format", "type"), "'json_schema'"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, ("tools", 0, "name"), "Field required"),
    ({"tools": [{"type": "function", "name": "has space"}]}, ("tools", 0, "name"), "pattern"),
    ({"tools": [flat(WEATHER)], "tool_choice": {"type": "function", "name": "nope"}}, ("tool_choice",), "'nope'"),
    ({"tool_choice": "sometimes"}, ("tool_choice",), "'auto'"),
]


@pytest.mark.parametrize("fields, loc, words", BAD)
def test_bad_values_name_their_field(fields, loc, words):
    with pytest.raises(ValidationError) as error:
        request(**fields)
    first = error.value.errors()[0]
    assert first["loc"][:len(loc)] == loc and words in first["msg"], first


def test_text_that_is_not_unicode_is_refused_where_chat_refuses_it():
    with pytest.raises(ParamError, match="input holds"):
        to_chat(request(input="a\ud800b"))


# -- the response ----------------------------------------------------------------------------------------------


def test_whole_text_response_is_openais_object():
    body = request(instructions="Be brief.", temperature=0.3, max_output_tokens=9, metadata={"k": "v"})
    raw = ResponseBuilder("gemma", body).whole("Paris.", [], Finished("stop", 12, 3, cached_tokens=8))
    response = Response.model_validate(raw)
    assert response.output_text == "Paris." and response.status == "completed" and raw["id"].startswith("resp_")
    assert response.output[0].id.startswith("msg_") and response.output[0].status == "completed"
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (12, 3, 15)
    assert usage.input_tokens_details.cached_tokens == 8 and usage.output_tokens_details.reasoning_tokens == 0
    assert (response.instructions, response.temperature, response.top_p, response.max_output_tokens) == \
           ("Be brief.", 0.3, 1.0, 9)
    assert response.metadata == {"k": "v"} and response.text.format.type == "text" and response.tool_choice == "auto"


def test_whole_response_with_calls_and_a_cut_one():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = request(tools=[flat(WEATHER)], tool_choice={"type": "function", "name": "get_current_weather"},
                   text={"format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True}})
    reply = T.parse_reply(GEMMA3, '{"name": "get_current_weather", "parameters": {"location": "Oslo"}}',
                          T.check_tools(*to_chat(body)[1:3]))
    response = Response.model_validate(ResponseBuilder("gemma", body).whole(reply.content, reply.tool_calls,
                                                                            Finished("stop", 30, 20)))
    [call] = response.output
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_current_weather",
                                                                 {"location": "Oslo"})
    assert call.call_id == reply.tool_calls[0]["id"] and call.id.startswith("fc_") and call.status == "completed"
    assert response.tools[0].name == "get_current_weather" and response.tool_choice.name == "get_current_weather"
    assert response.text.format.schema_ == schema and response.text.format.strict
    cut = Response.model_validate(ResponseBuilder("gemma", body).whole("It is", [], Finished("length", 3, 2)))
    assert (cut.status, cut.incomplete_details.reason, cut.output[0].status) == \
           ("incomplete", "max_output_tokens", "incomplete")
    empty = Response.model_validate(ResponseBuilder("gemma", body).whole(None, [], Finished("stop", 3, 1)))
    assert empty.output_text == "" and len(empty.output) == 1


def events_of(sse: list[str]) -> list[dict]:
    """Each SSE string as OpenAI sends it (`event: TYPE`, `data: JSON`), checked by the client's event union."""
    out = []
    for text in sse:
        match = re.fullmatch(r"event: ([\w.]+)\ndata: (.+)\n\n", text, re.S)
        assert match, text
        data = json.loads(match.group(2))
        assert data["type"] == match.group(1)
        EVENTS.validate_python(data)
        out.append(data)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def sse(body: ResponsesRequest, fmt, chunks: list[str], finished: Finished) -> list[str]:
    """The SSE events for a reply arriving in `chunks`, read for calls as the app does (tools.ToolStream)."""
    builder = ResponseBuilder("gemma", body)
    chat = to_chat(body)
    tools = T.check_tools(chat.tools, chat.tool_choice)
    stream = T.ToolStream(fmt, tools) if tools.active else None
    events = builder.start()
    for chunk in chunks:
        events += builder.add(*(stream.push(chunk) if stream else (chunk, [])))
    if stream:
        events += builder.add(*stream.finish())
    return events + builder.end(finished)


def streamed(body: ResponsesRequest, fmt, chunks: list[str], finished: Finished) -> list[dict]:
    return events_of(sse(body, fmt, chunks, finished))


def test_streamed_text_events_in_order():
    events = streamed(request(), GEMMA3, ["The capital", " of France", " is Paris."], Finished("stop", 5, 6))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == \
           "The capital of France is Paris."
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == "The capital of France is Paris." and final.usage.output_tokens == 6
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert len({e["response"]["id"] for e in (events[0], events[1], events[-1])}) == 1


def test_streamed_calls_after_text_each_their_own_item():
    """Gemma 4's native calls after some text: the message closes, each call is an item whose arguments add up."""
    fmt = T.Native(*T.GEMMA4)  # the parser needs no token ids
    text = ('Let me look. <|tool_call>call:search{filters:{safe:true},query:<|"|>cats<|"|>}<tool_call|>'
            '<|tool_call>call:get_current_weather{location:<|"|>Rome<|"|>}<tool_call|>')
    body = request(tools=[flat(WEATHER), flat(SEARCH)])
    events = streamed(body, fmt, [text[i:i + 7] for i in range(0, len(text), 7)], Finished("stop", 40, 30))
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "response.completed" and kinds.count("response.output_item.added") == 3
    assert kinds.count("response.output_item.done") == 3 and kinds.count("response.function_call_arguments.done") == 2
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    assert added == ["message", "function_call", "function_call"]
    final = Response.model_validate(events[-1]["response"])
    assert final.output[0].content[0].text == "Let me look. "
    assert [(c.name, json.loads(c.arguments)) for c in final.output[1:]] == [
        ("search", {"filters": {"safe": True}, "query": "cats"}), ("get_current_weather", {"location": "Rome"})]
    for index, call in enumerate(final.output[1:], start=1):
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
                         and e["output_index"] == index)
        assert deltas == call.arguments and call.status == "completed"


def test_streamed_json_call_cut_by_the_limit_is_incomplete():
    body = request(tools=[flat(WEATHER)], tool_choice="required", max_output_tokens=12)
    text = '{"name": "get_current_weather", "parameters": {"location": "Ber'
    events = streamed(body, GEMMA3, [text[:20], text[20:40], text[40:]], Finished("length", 9, 12))
    assert events[-1]["type"] == "response.incomplete"
    final = Response.model_validate(events[-1]["response"])
    assert final.incomplete_details.reason == "max_output_tokens" and final.output[0].status == "incomplete"
    assert final.output[0].arguments == '{"location": "Ber'


def test_an_empty_answer_is_an_empty_message_and_a_failure_is_response_failed():
    events = streamed(request(), GEMMA3, [], Finished("stop", 4, 1))
    assert Response.model_validate(events[-1]["response"]).output_text == ""
    assert [e["type"] for e in events][2:6] == ["response.output_item.added", "response.content_part.added",
                                                "response.output_text.done", "response.content_part.done"]
    builder = ResponseBuilder("gemma", request())
    events = builder.start() + builder.add("Half an ans", []) + builder.fail("RuntimeError: the backend fell over")
    failed = events_of(events)[-1]
    assert failed["type"] == "response.failed"
    response = Response.model_validate(failed["response"])
    assert response.status == "failed" and response.error.code == "server_error"
    assert "fell over" in response.error.message and response.output[0].content[0].text == "Half an ans"


# -- the official client, in-process -----------------------------------------------------------------------------


@pytest.fixture
def client():
    """openai.OpenAI against a stub app of this test's own: it serves canned replies through the builder, as the
    server's /v1/responses will (tools read by tools.ToolStream in Gemma 3's JSON format)."""
    fastapi = pytest.importorskip("fastapi")
    from fastapi.responses import StreamingResponse
    from starlette.testclient import TestClient

    app = fastapi.FastAPI()
    app.state.reply = "Paris."

    @app.post("/v1/responses")
    async def create(body: ResponsesRequest):
        text = app.state.reply
        finished = Finished("stop", 10, len(text.split()))
        if not body.stream:
            chat = to_chat(body)
            reply = T.parse_reply(GEMMA3, text, T.check_tools(chat.tools, chat.tool_choice))
            return ResponseBuilder("gemma", body).whole(reply.content, reply.tool_calls, finished)
        events = sse(body, GEMMA3, [text[i:i + 5] for i in range(0, len(text), 5)], finished)
        return StreamingResponse(iter(events), media_type="text/event-stream")

    with TestClient(app) as http:
        yield openai.OpenAI(api_key="test", base_url="http://testserver/v1", http_client=http), app


def test_the_client_creates_and_streams_text(client):
    api, app = client
    app.state.reply = "The capital of France is Paris."
    response = api.responses.create(model="gemma", input="Capital of France?", instructions="Be brief.")
    assert response.output_text == app.state.reply and response.instructions == "Be brief."
    deltas = [e.delta for e in api.responses.create(model="gemma", input="Capital?", stream=True)
              if e.type == "response.output_text.delta"]
    assert "".join(deltas) == app.state.reply
    with api.responses.stream(model="gemma", input="Capital?") as stream:
        final = stream.get_final_response()
    assert final.output_text == app.state.reply and final.status == "completed"


def test_the_client_parses_structured_output_and_calls(client):
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        name: str
        population: int

    api, app = client
    app.state.reply = '{"name": "Paris", "population": 2102650}'
    parsed = api.responses.parse(model="gemma", input="Paris?", text_format=City)
    assert parsed.output_parsed == City(name="Paris", population=2102650)
    app.state.reply = '{"name": "get_current_weather", "parameters": {"location": "Oslo", "unit": "celsius"}}'
    tools = [flat(WEATHER)]
    response = api.responses.create(model="gemma", input="Weather in Oslo?", tools=tools, tool_choice="required")
    [call] = response.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"location": "Oslo", "unit": "celsius"}
    with api.responses.stream(model="gemma", input="Weather in Oslo?", tools=tools) as stream:
        final = stream.get_final_response()
    assert [(c.name, json.loads(c.arguments)) for c in final.output] == [
        ("get_current_weather", {"location": "Oslo", "unit": "celsius"})]
    # the call sent back with its output: the next turn's conversation, as chat has it
    follow = ResponsesRequest.model_validate({"model": "gemma", "input": [
        {"role": "user", "content": "Weather in Oslo?"}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "12 C"}]})
    assert [m["role"] for m in to_chat(follow).messages] == ["user", "assistant", "tool"]
