"""The OpenAI app in this process (Starlette's TestClient and raw ASGI calls) on tiny-gemma3's static artifact with
the tiny tokenizer: every status code with OpenAI's error body, SSE framing, n choices, auth, body limits, a client
that goes away, and the server healthy and serving after each bad request. The socket-level limits (the headers'
deadline) on a real uvicorn server in a thread."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import pytest

import runtime
from runtime import SamplingParams
from tests.servers import free_port, wait_until

pytest.importorskip("fastapi", reason="the serve extra")
from starlette.testclient import TestClient  # noqa: E402

from runtime.serving import create_app  # noqa: E402
from runtime.serving.options import ServeOptions  # noqa: E402

KEY = "test-key"
NAME = "static"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """tiny-gemma3, static layout with 1,024 slots a row (a prompt with tool declarations is ~700 tokens)."""
    from exporter import ExportOptions, export

    from .conftest import add_text_files

    root = tmp_path_factory.mktemp("app")
    export("random:tiny-gemma3", root / "plain", ExportOptions(kv_cache="static", max_length=1024, verify=False,
                                                                progress=False))
    return add_text_files(root / "plain", root / NAME)


@pytest.fixture(scope="module")
def alone(artifact):
    """The runtime on its own: what a served request must equal."""
    return runtime.load(artifact)


def client_for(artifact, **options):
    app = create_app(artifact, ServeOptions(**{"max_batch_size": 4, **options}), load_now=True)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(artifact):
    with client_for(artifact, max_queue=2, body_timeout=1.0) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(artifact):
    with client_for(artifact, api_key=KEY) as c:
        yield c


def post(client, path, body, headers=None):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post(path, content=data, headers={"Content-Type": "application/json", **(headers or {})})


def complete(client, **kw):
    return post(client, "/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **kw})


def assert_healthy(client):
    assert client.get("/health").status_code == 200
    ok = complete(client, max_tokens=2)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def events(response) -> list:
    """The SSE events of a streamed response: each `data: ...` line followed by a blank line; [DONE] last."""
    text = response.text
    assert text.endswith("data: [DONE]\n\n")
    blocks = text.split("\n\n")[:-1]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
    return [json.loads(b[6:]) for b in blocks[:-1]]


# -- what a request gets ---------------------------------------------------------------------------------------


def test_completions_and_chat_whole_and_streamed_equal_the_runtime_alone(client, alone):
    expected = alone.generate_text(PROMPT, SamplingParams(max_new_tokens=8))
    reply = complete(client).json()
    assert reply["choices"][0]["text"] == expected and reply["choices"][0]["finish_reason"] == "length"
    assert reply["object"] == "text_completion" and reply["model"] == NAME and reply["id"].startswith("cmpl-")
    prompt_tokens = len(alone.tokenizer.encode(PROMPT))
    assert reply["usage"]["prompt_tokens"] == prompt_tokens and reply["usage"]["completion_tokens"] == 8

    chunks = events(complete(client, stream=True, stream_options={"include_usage": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 8

    messages = [{"role": "user", "content": "Hi"}]
    rendered = alone.apply_chat_template(messages)
    answer = alone.generate_text(rendered, SamplingParams(max_new_tokens=6), chat=True)
    chat = post(client, "/v1/chat/completions", {"model": NAME, "messages": messages, "max_tokens": 6,
                                                 "temperature": 0}).json()
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": answer}
    streamed = events(post(client, "/v1/chat/completions", {"model": NAME, "messages": messages, "max_tokens": 6,
                                                            "temperature": 0, "stream": True}))
    assert streamed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == answer


def test_n_choices_each_equal_the_request_alone_with_its_seed(client, alone):
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
    by_seed = [alone.generate_text(PROMPT, sampled.replace(seed=7 + i)) for i in range(3)]
    reply = complete(client, n=3, temperature=1.0, seed=7).json()
    assert [c["text"] for c in reply["choices"]] == by_seed and [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert reply["usage"]["completion_tokens"] == 24
    streamed = events(complete(client, n=3, temperature=1.0, seed=7, stream=True))
    texts = ["".join(c["choices"][0]["text"] for c in streamed if c["choices"][0]["index"] == i) for i in range(3)]
    assert texts == by_seed


def test_metrics_carry_vllms_names_too(client):
    complete(client)
    text = client.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:prefix_cache_queries_total", "vllm:time_to_first_token_seconds",
                 "vllm:e2e_request_latency_seconds", "gemma_prefix_cache_hits_total", 'model_name="static"'):
        assert name in text


# -- bad requests: OpenAI's error body, and the server goes on ----------------------------------------------------


BAD = [
    (b"{not json", 400, None, "not a valid JSON object"),
    (b'{"model": "static", "prompt": "\xff\xfe"}', 400, None, "not a valid JSON object"),  # not UTF-8
    (b"[1, 2]", 400, None, "not a valid JSON object"),
    ({"prompt": "x"}, 400, "model", "model: Field required"),
    ({"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ({"model": NAME, "prompt": "x", "max_tokens": True}, 400, "max_tokens", "valid integer"),
    ({"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"model": NAME, "prompt": "x", "temperature": 3}, 400, "temperature", "expected a number 0 <= x <= 2"),
    (b'{"model": "static", "prompt": "x", "repetition_penalty": Infinity}', 400, "repetition_penalty", "finite"),
    ({"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p", "0 < x <= 1"),
    ({"model": NAME, "prompt": "x", "n": 9}, 400, "n", "at most 4 choices"),
    ({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
    ({"model": NAME, "prompt": "x", "best_of": 2}, 400, "best_of", "send n instead"),
    ({"model": NAME, "prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias", "not served"),
    ({"model": NAME, "prompt": "word " * 1000}, 400, "prompt", "context holds 1024"),
    ({"model": NAME, "prompt": "x", "max_tokens": 2000}, 400, "max_tokens", "lower max_tokens to"),
    ({"model": NAME, "prompt": [1, 2, 99999]}, 400, "prompt", "token ids must be in 0..511"),
    ({"model": NAME, "prompt": "a \ud800 b"}, 400, "prompt", "not valid Unicode text"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("body, status, param, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_completions_get_openai_errors_and_the_server_goes_on(client, body, status, param, words):
    response = post(client, "/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert words in error["message"], error["message"]
    assert_healthy(client)


@pytest.mark.parametrize("body, param, words", [
    ({"messages": [{"role": "user", "content": "a \udfff"}]}, "messages", "not valid Unicode text"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "roles must alternate"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 30}, "top_logprobs",
     "<= 20"),
    ({"messages": [{"role": "user", "content": "x " * 1000}]}, "messages", "context holds 1024"),
])
def test_bad_chats_name_the_chat_field(client, body, param, words):
    response = post(client, "/v1/chat/completions", {"model": NAME, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and words in response.json()["error"]["message"]
    assert_healthy(client)


def test_a_tiny_temperature_is_greedy_not_nan(client, alone):
    reply = complete(client, temperature=1e-40).json()
    assert reply["choices"][0]["text"] == alone.generate_text(PROMPT, SamplingParams(max_new_tokens=8))


def test_unknown_paths_and_methods_are_openai_errors(client):
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = client.get("/v1/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert_healthy(client)


def test_api_key(keyed):
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": "Bearer ".encode() + "kéy".encode("latin-1")}):
        refused = keyed.post("/v1/completions", json=body, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["www-authenticate"] == "Bearer"
    for scheme in ("Bearer", "bearer", "BEARER"):  # the scheme is case-insensitive (RFC 7235)
        assert keyed.post("/v1/completions", json=body, headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    assert keyed.get("/health").status_code == 200 and keyed.get("/metrics").status_code == 200


# -- the body, raw: chunked, slow, too large; a client that goes away -------------------------------------------


async def raw(app, body_chunks, delay: float = 0.0, headers=(), path="/v1/completions", disconnect_after=None):
    """Call the ASGI app as a server would: the body in `body_chunks` (no Content-Length: chunked), `delay` seconds
    between chunks; with `disconnect_after` the client goes away that many seconds after its body. (status, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5000),
             "headers": [(b"content-type", b"application/json"), *headers]}
    chunks, sent = list(body_chunks), []

    async def receive():
        if chunks:
            if delay:
                await asyncio.sleep(delay)
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        if disconnect_after is not None:
            await asyncio.sleep(disconnect_after)
        else:
            await asyncio.Event().wait()  # never: the client stays
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_a_chunked_body_is_limited_as_it_streams_in(client):
    big = [b'{"model": "static", "prompt": "' + b"x" * 60_000] * 20 + [b'"}']  # 1.2 MB, no Content-Length
    status, body = client.portal.call(raw, client.app, big)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    huge = post(client, "/v1/completions", {"model": NAME, "prompt": "x" * (2 << 20)})  # with Content-Length
    assert huge.status_code == 413
    assert_healthy(client)


def test_a_slow_body_times_out(client):
    body = json.dumps({"model": NAME, "prompt": PROMPT, "max_tokens": 2}).encode()
    started = time.monotonic()
    status, reply = client.portal.call(raw, client.app, [body[i:i + 8] for i in range(0, len(body), 8)], 0.2)
    assert status == 408 and json.loads(reply)["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < 3  # body_timeout 1 s, not the 2+ s the body would take
    assert_healthy(client)


def test_a_big_prompt_is_tokenized_off_the_event_loop(client):
    """A prompt just under the body limit takes a while to tokenize; /health answers meanwhile."""
    body = {"model": NAME, "prompt": "the capital of France is Paris " * 30_000}
    done, waits = threading.Event(), []

    def send():
        post(client, "/v1/completions", body)
        done.set()

    thread = threading.Thread(target=send)
    started = time.monotonic()
    thread.start()
    while not done.is_set():
        before = time.monotonic()
        assert client.get("/health").status_code == 200
        waits.append(time.monotonic() - before)
    thread.join()
    busy = time.monotonic() - started
    assert len(waits) >= 3 and max(waits) < busy / 2, (busy, waits)  # it answered all along


def test_a_client_that_goes_away_frees_its_row_at_the_next_step(artifact):
    """Non-streaming: the request is cancelled as soon as the client disconnects, not when it would have ended."""
    with client_for(artifact) as slow:
        model = slow.app.state.gemma.model
        run = model.backend._run

        def slowed(*args, **kwargs):  # 30 ms a step: 50 tokens would take 1.5 s
            time.sleep(0.03)
            return run(*args, **kwargs)

        model.backend._run = slowed
        body = json.dumps({"model": NAME, "prompt": PROMPT, "max_tokens": 50, "ignore_eos": True}).encode()
        started = time.monotonic()
        status, _ = slow.portal.call(raw, slow.app, [body], 0.0, (), "/v1/completions", 0.3)
        assert status == 499 and time.monotonic() - started < 1.2
        scheduler = slow.app.state.gemma.scheduler
        wait_until(lambda: scheduler.running == 0, 5, "the row freed")
        metrics = slow.get("/metrics").text
        assert 'gemma_requests_finished_total{reason="cancelled"} 1.0' in metrics


def test_the_queue_takes_rows_plus_max_queue_then_429(artifact):
    with client_for(artifact, max_batch_size=1, max_queue=1) as small:
        model = small.app.state.gemma.model
        run = model.backend._run
        model.backend._run = lambda *a, **k: (time.sleep(0.02), run(*a, **k))[1]
        statuses, retry = [], []

        def send():
            response = complete(small, max_tokens=20)
            statuses.append(response.status_code)
            retry.append(response.headers.get("retry-after"))

        threads = [threading.Thread(target=send) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(statuses) == [200, 200, 429, 429] and retry[statuses.index(429)] == "1"


# -- on a real socket: uvicorn's limits ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def socket_server(artifact):
    import uvicorn

    from runtime.serving import _timed_h11

    port = free_port()
    options = ServeOptions(max_batch_size=2, header_timeout=0.5)
    config = uvicorn.Config(create_app(artifact, options, load_now=True), host="127.0.0.1", port=port,
                            log_level="warning", http=_timed_h11(options.header_timeout), lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "uvicorn started")
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def test_headers_sent_a_byte_at_a_time_are_cut_off(socket_server):
    with socket.create_connection(("127.0.0.1", socket_server), timeout=5) as s:
        started = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never the blank line that ends the headers
        assert s.recv(100) == b""  # closed by the server
        assert time.monotonic() - started < 3
    with socket.create_connection(("127.0.0.1", socket_server), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")


# -- structured outputs, tools, the Responses API, the page -------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer",
          "minimum": 1, "maximum": 9}}, "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": SCHEMA}}


def test_response_format_json_schema_always_parses_and_validates(client):
    jsonschema = pytest.importorskip("jsonschema")
    for seed in range(3):
        body = {"model": NAME, "messages": [{"role": "user", "content": "Plan a trip"}], "max_tokens": 40,
                "temperature": 1.0, "seed": seed,
                "response_format": {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}}}
        reply = post(client, "/v1/chat/completions", body).json()
        jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), SCHEMA)
        assert reply["choices"][0]["finish_reason"] == "stop"  # the grammar ended it, within max_tokens
    regex = complete(client, structured_outputs={"regex": "[0-9]{3}-[a-z]{2}"}, max_tokens=20).json()
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", regex["choices"][0]["text"])
    choice = complete(client, structured_outputs={"choice": ["yes", "no"]}).json()
    assert choice["choices"][0]["text"] in ("yes", "no")


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", ""),
    ({"response_format": {"type": "xml"}}, "response_format", "not served"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", ""),
    ({"guided_json": {"type": "object"}}, "guided_json", "structured_outputs.json"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "drop it"),
])
def test_a_constraint_the_engine_cannot_take_is_a_400_naming_it(client, body, param, words):
    response = complete(client, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and words in response.json()["error"]["message"]
    assert_healthy(client)


def test_required_and_named_tool_calls_parse_and_validate(client):
    jsonschema = pytest.importorskip("jsonschema")
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = post(client, "/v1/chat/completions", {"model": NAME, "messages": messages, "tools": [WEATHER],
                                                      "tool_choice": choice, "max_tokens": 200, "temperature": 0})
        message = reply.json()["choices"][0]["message"]
        assert reply.json()["choices"][0]["finish_reason"] == "tool_calls", reply.json()
        call = message["tool_calls"][0]
        assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA)
    streamed = events(post(client, "/v1/chat/completions", {"model": NAME, "messages": messages, "tools": [WEATHER],
                                                            "tool_choice": "required", "max_tokens": 200,
                                                            "temperature": 0, "stream": True}))
    deltas = [d for c in streamed for d in c["choices"][0]["delta"].get("tool_calls", [])]
    arguments = "".join(d["function"].get("arguments", "") for d in deltas)
    assert deltas[0]["function"]["name"] == "get_weather" and json.loads(arguments) == json.loads(
        call["function"]["arguments"])
    assert streamed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # the call and its result go back into the conversation
    history = [*messages, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'}]
    answer = post(client, "/v1/chat/completions", {"model": NAME, "messages": history, "tools": [WEATHER],
                                                   "max_tokens": 6, "temperature": 0})
    assert answer.status_code == 200, answer.text
    bad = post(client, "/v1/chat/completions", {"model": NAME, "messages": messages, "tools": [{"type": "function"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools[0]"


def test_the_responses_api_through_the_openai_client(client, alone):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    expected = alone.generate_text(alone.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Hi"}]),
                                   SamplingParams(max_new_tokens=6), chat=True)
    response = api.responses.create(model=NAME, instructions="Be brief.", input="Hi", max_output_tokens=6,
                                    temperature=0)
    assert response.output_text == expected and response.status == "incomplete"  # it hit max_output_tokens
    assert response.usage.output_tokens == 6
    streamed = list(api.responses.create(model=NAME, instructions="Be brief.", input="Hi", max_output_tokens=6,
                                         temperature=0, stream=True))
    assert streamed[0].type == "response.created" and streamed[-1].type == "response.incomplete"
    assert "".join(e.delta for e in streamed if e.type == "response.output_text.delta") == expected
    assert streamed[-1].response.output_text == expected
    structured = api.responses.create(model=NAME, input="Plan a trip", max_output_tokens=40, temperature=0,
                                      text={"format": {"type": "json_schema", "name": "trip", "schema": SCHEMA}})
    assert json.loads(structured.output_text)["city"] in ("Paris", "Rome")
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        api.responses.create(model=NAME, input="Hi", previous_response_id="resp_1")


def test_the_chat_page_is_served_at_the_root(keyed):
    page = keyed.get("/")  # no API key: the page asks for it when the API answers 401
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="chat.js"' in page.text
    assert keyed.get("/chat.js").status_code == 200 and keyed.get("/chat.css").status_code == 200
