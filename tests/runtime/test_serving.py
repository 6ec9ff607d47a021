"""gemma-run serve on the real model, as a process on 127.0.0.1, through the official openai client: completions,
chat, streaming, stop strings, seeds and logprobs with the real tokenizer and text; continuous batching (staggered
requests each as alone); the prefix cache (greedy outputs as without it; a 10-turn chat computes each new turn
only); a streaming client that goes away; SIGTERM. The HTTP contract itself (every status code, the error body,
limits) is tests/runtime/test_app.py's, in-process on a tiny artifact."""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time

import httpx
import pytest

import runtime
from tests.servers import free_port, get, running, wait_until

pytestmark = pytest.mark.real
openai = pytest.importorskip("openai", reason="the openai client is in the test extra")

KEY = "test-key"
PROMPTS = ["The capital of France is", "LLMs generate text through a process known as", "def fibonacci(n):",
           "Once upon a time, in a land far away, there lived", "The three primary colors are", "Water boils at",
           "The history of the city begins with a small fishing village on the banks of a wide river. " * 6,
           "In 1492,"]


def serve_command(artifact, port, *options):
    return [sys.executable, "-m", "runtime.cli", "serve", str(artifact), "--port", str(port), *map(str, options)]


@pytest.fixture(scope="module")
def server(real_static_artifact, tmp_path_factory):
    """The server the correctness tests share: an API key, 8 rows."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running(serve_command(real_static_artifact, port, "--api-key", KEY, "--max-batch-size", 8), 
                 f"http://127.0.0.1:{port}/health", log) as process:
        process.url = f"http://127.0.0.1:{port}"
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def alone(real_static_artifact):
    """The runtime on its own, in this process: what a request must equal."""
    return runtime.load(real_static_artifact)


NAME = "gemma3-270m-static"


def complete(client, prompt, **kw):
    return client.completions.create(model=NAME, prompt=prompt, **{"max_tokens": 20, "temperature": 0, **kw})


def test_completion_chat_stream_stop_and_seed(client, alone):
    options = runtime.SamplingParams(max_new_tokens=20)
    expected = alone.generate_text(PROMPTS[0], options)
    reply = complete(client, PROMPTS[0])
    assert reply.choices[0].text == expected and expected.startswith(" the capital of the country of France")
    assert reply.choices[0].finish_reason == "length" and reply.object == "text_completion"
    assert reply.id.startswith("cmpl-") and reply.created > 0 and reply.model == NAME
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(alone.tokenizer.encode(PROMPTS[0])), 20)

    chunks = list(complete(client, PROMPTS[0], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-2].choices[0].finish_reason == "length"

    stop = expected[10:16]
    cut = complete(client, PROMPTS[0], stop=[stop])
    assert cut.choices[0].text == expected[: expected.find(stop)] and cut.choices[0].finish_reason == "stop"

    messages = [{"role": "user", "content": "Name a color."}]
    rendered = alone.apply_chat_template(messages)
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == alone.generate_text(rendered, runtime.SamplingParams(max_new_tokens=12),
                                                                   chat=True)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content

    seeded = [complete(client, PROMPTS[1], temperature=0.9, top_p=0.95, seed=7).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1] != complete(client, PROMPTS[1], temperature=0.9, top_p=0.95, seed=8).choices[0].text
    assert seeded[0] == alone.generate_text(PROMPTS[1], runtime.SamplingParams(max_new_tokens=20, temperature=0.9,
                                                                                  top_p=0.95, seed=7))


def test_logprobs_are_the_runtimes_log_softmax(client, alone):
    import numpy as np

    reply = complete(client, PROMPTS[0], max_tokens=3, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 3 and all(len(top) == 2 for top in logprobs.top_logprobs)
    ids = np.array([alone.tokenizer.encode(PROMPTS[0])])
    logits = alone.new_cache(1, 16).feed(slice(0, 1), ids)[0]
    expected = -np.log(np.exp(logits - logits.max()).sum(dtype=np.float64))  # log-softmax of the top token
    assert logprobs.token_logprobs[0] == pytest.approx(expected, abs=1e-4)  # greedy: the top token's


def test_staggered_requests_are_each_what_they_give_alone(client, alone):
    """8 prompts of different lengths, arriving 150 ms apart, decode together: each completion is token for token
    the request's alone, and what `gemma-run generate` prints; a seeded sampled request is unchanged by the batch."""
    from click.testing import CliRunner

    from runtime.cli import main

    by_itself = [complete(client, p, max_tokens=24).choices[0].text for p in PROMPTS]
    assert by_itself[0] == alone.generate_text(PROMPTS[0], runtime.SamplingParams(max_new_tokens=24))
    printed = CliRunner().invoke(main, ["generate", str(alone.manifest.folder), PROMPTS[2], "-n", "24"]).output
    assert printed == by_itself[2] + "\n"
    sampled_alone = complete(client, PROMPTS[3], max_tokens=24, temperature=0.8, seed=11).choices[0].text

    together, sampled = [None] * len(PROMPTS), [None]

    def send(i):
        time.sleep(0.15 * i)
        together[i] = complete(client, PROMPTS[i], max_tokens=24).choices[0].text

    def send_sampled():
        time.sleep(0.3)
        sampled[0] = complete(client, PROMPTS[3], max_tokens=24, temperature=0.8, seed=11).choices[0].text

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(PROMPTS))]
    threads.append(threading.Thread(target=send_sampled))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert together == by_itself
    assert sampled[0] == sampled_alone


def metric(server, name: str) -> float:
    _, text = get(f"{server.url}/metrics")
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text.decode(), re.M)
    return float(match.group(1)) if match else 0.0


def test_a_client_that_disconnects_frees_its_row(server, client):
    cancelled = 'gemma_requests_finished_total{reason="cancelled"}'
    before = metric(server, cancelled)
    body = {"model": NAME, "prompt": PROMPTS[4], "max_tokens": 400, "temperature": 0, "stream": True}
    other = threading.Thread(target=lambda: complete(client, PROMPTS[5], max_tokens=30))
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        other.start()
        wait_until(lambda: metric(server, "gemma_running_rows") >= 1, 30, "the stream's row in use")
    # the connection is closed, mid-stream: the row is freed, and the other request goes on
    wait_until(lambda: metric(server, cancelled) == before + 1, 30, "the cancelled request counted")
    other.join(timeout=60)
    wait_until(lambda: metric(server, "gemma_running_rows") == 0, 30, "every row free again")


def test_the_prefix_cache_changes_what_is_computed_not_what_is_generated(client, alone):
    """A shared ~1,500-token prefix with different questions, and a 10-turn chat re-sent whole each turn: greedy
    replies equal the runtime's alone (without any cache), and each turn's prompt comes from the cache but for its
    new tokens (usage.prompt_tokens_details.cached_tokens)."""
    system = (PROMPTS[6] * 4)[:6000]
    for question in ("What is the river called?", "Who lived there first?"):
        prompt = f"{system}\n\nQuestion: {question}\nAnswer:"
        reply = complete(client, prompt, max_tokens=12)
        assert reply.choices[0].text == alone.generate_text(prompt, runtime.SamplingParams(max_new_tokens=12))
    assert reply.usage.prompt_tokens_details.cached_tokens >= len(alone.tokenizer.encode(system)) - 2

    messages = []
    for turn in range(10):
        messages.append({"role": "user", "content": f"Tell me one fact about the number {turn + 2}."})
        chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
        answer = chat.choices[0].message.content
        rendered = alone.apply_chat_template(messages)
        assert answer == alone.generate_text(rendered, runtime.SamplingParams(max_new_tokens=16), chat=True)
        computed = chat.usage.prompt_tokens - chat.usage.prompt_tokens_details.cached_tokens
        new = len(alone.tokenizer.encode(messages[-1]["content"], add_special_tokens=False))
        if turn:  # the new user turn, its template tokens and the end of the last reply as the template writes it
            assert computed <= new + 12, (turn, computed, new)
        messages.append({"role": "assistant", "content": answer})


def test_structured_answers_and_forced_tool_calls_validate(client):
    """The base 270M under each held-out schema (nested objects, enums, bounded arrays, nullable fields, patterns),
    the requests together in one batch, greedy: every answer ends within max_tokens and validates; a required tool
    call parses and its arguments follow the function's parameters."""
    jsonschema = pytest.importorskip("jsonschema")
    from tests.runtime.test_grammar import SCHEMAS

    answers = {}

    def ask(name):
        answers[name] = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"A {name} record, as JSON."}], max_tokens=300,
            temperature=0, response_format={"type": "json_schema",
                                            "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}})

    threads = [threading.Thread(target=ask, args=(name,)) for name in SCHEMAS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for name, schema in SCHEMAS.items():
        choice = answers[name].choices[0]
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)

    weather = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                "parameters": {"type": "object", "properties": {
                                                    "city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                    "required": ["city", "unit"], "additionalProperties": False}}}
    called = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Weather in Rome?"}],
                                            tools=[weather], tool_choice="required", max_tokens=100, temperature=0)
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), weather["function"]["parameters"])


def test_sigterm_finishes_the_requests_under_way_and_exits_0(server):
    """Last: it stops the server."""
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as response:
        lines = response.iter_lines()
        first = next(lines)
        server.process.send_signal(signal.SIGTERM)
        rest = [line for line in [first, *lines] if line]  # events are separated by blank lines
    assert rest[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in rest if line.startswith("data: {"))
    assert text.startswith(" the capital of the country of France")
    assert server.process.wait(timeout=30) == 0
