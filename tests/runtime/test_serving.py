"""gemma-run serve on the real model, through the official openai client and plain HTTP: completions, chat,
streaming, stop strings and seeds; continuous batching (staggered requests each as alone); a client that goes
away; bad input and faults (the server keeps serving); SIGTERM. Servers run as processes on 127.0.0.1."""

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
    alone.backend.reset(1, 16)
    logits = alone.backend.forward(ids, np.ones_like(ids), np.arange(ids.shape[1])[None])[0]
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


@pytest.fixture(scope="module")
def small_server(real_static_artifact, tmp_path_factory):
    """One row and one waiting request: the queue fills at once."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve-small") / "server.log"
    with running(serve_command(real_static_artifact, port, "--max-batch-size", 1, "--max-queue", 1, "--grace", 20),
                 f"http://127.0.0.1:{port}/health", log) as process:
        process.url = f"http://127.0.0.1:{port}"
        yield process


def post(server, path, body, headers=None):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=data, timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})})


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),
    ({"prompt": "x"}, 400, "model", "model: Field required"),
    ({"model": NAME, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "max_tokens: Input should be a valid"),
    ({"model": NAME, "prompt": "x", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"model": NAME, "prompt": "x", "n": 2}, 400, "n", "only n=1"),
    ({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
    ({"model": NAME, "prompt": "word " * 8300}, 400, "prompt", "context holds 8192"),
    ({"model": NAME, "prompt": "x", "max_tokens": 9000}, 400, "max_tokens", "lower max_tokens to"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(small_server, body, status, param, words):
    response = post(small_server, "/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert words in error["message"], error["message"]
    assert get(f"{small_server.url}/health")[0] == 200
    ok = post(small_server, "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_api_key_body_size_and_a_full_queue(server, small_server):
    assert post(server, "/v1/completions", {"model": NAME, "prompt": "x"}).status_code == 401  # no key
    wrong = post(server, "/v1/completions", {"model": NAME, "prompt": "x"}, {"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert get(f"{server.url}/health")[0] == 200 and get(f"{server.url}/v1/models")[0] == 401
    assert json.loads(get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})[1])["data"][0]["id"] == NAME

    huge = post(small_server, "/v1/completions", {"model": NAME, "prompt": "x" * (2 << 20)})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"

    statuses, headers = [], []

    def send():
        response = post(small_server, "/v1/completions", {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 40})
        statuses.append(response.status_code)
        headers.append(response.headers.get("retry-after"))

    threads = [threading.Thread(target=send) for _ in range(4)]  # one row, one waiting: the rest are refused
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(statuses).count(200) >= 2 and 429 in statuses
    assert headers[statuses.index(429)] == "1"
    assert get(f"{small_server.url}/health")[0] == 200


def test_a_dynamic_layout_artifact_is_refused_with_the_export_line(real_artifact):
    from click.testing import CliRunner

    from runtime.cli import main

    result = CliRunner().invoke(main, ["serve", str(real_artifact), "--port", str(free_port())])
    assert result.exit_code == 2
    assert "dynamic KV layout" in result.output and "--kv-cache static" in result.output


def test_sigterm_finishes_the_requests_under_way_and_exits_0(small_server):
    """Last: it stops the small server."""
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{small_server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = next(lines)
        small_server.process.send_signal(signal.SIGTERM)
        rest = [line for line in [first, *lines] if line]  # events are separated by blank lines
    assert rest[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in rest if line.startswith("data: {"))
    assert text.startswith(" the capital of the country of France")
    assert small_server.process.wait(timeout=30) == 0
