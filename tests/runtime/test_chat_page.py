"""The chat page (runtime/serving/static) in a real headless browser: Debian's chromium driven by Playwright, against
a stub server of this file that serves the page and imitates the API (its SSE, its 400 and 401 error bodies).

Never `playwright install` (it downloads a browser build, which fails here): scripts/setup.sh installs chromium."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import runtime.serving

STATIC = Path(runtime.serving.__file__).parent / "static"
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
ANSWER = ["The", " capital", " of", " France", " is", " Paris", "."]
LONG = [f" word{i}" for i in range(400)]  # 20 s at 50 ms a piece: long enough to stop
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


class Stub(BaseHTTPRequestHandler):
    """GET / and the page's files; GET /v1/models; POST /v1/chat/completions streaming ANSWER (LONG when the last
    message says "long"), a 400 OpenAI error for a temperature over 2, a 401 without the server's key."""

    server: "StubServer"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/v1/models":
            if self._refused():
                return
            return self._json(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})
        name = "index.html" if self.path == "/" else self.path.lstrip("/")
        path = STATIC / name
        if "/" in name or not path.is_file():
            return self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", TYPES[path.suffix])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"body": body, "authorization": self.headers.get("Authorization")})
        if self._refused():
            return
        if body.get("temperature", 1) > 2:
            return self._json(400, {"error": {
                "message": f"temperature: Input should be less than or equal to 2 (got {body['temperature']})",
                "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}})
        pieces = LONG if "long" in body["messages"][-1]["content"] else ANSWER
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        chunk = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": "stub-model"}
        try:
            self._event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for piece in pieces:
                time.sleep(0.05)
                self._event({**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            self._event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            self._event({**chunk, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(pieces),
                                                            "total_tokens": 5 + len(pieces)}})
            self.wfile.write(b"data: [DONE]\n\n")
            self.server.finished += 1
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnected += 1

    def _refused(self) -> bool:
        if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            self._json(401, {"error": {"message": "missing or wrong API key", "type": "invalid_request_error",
                                       "code": "invalid_api_key"}})
            return True
        return False

    def _event(self, data: dict):
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def _json(self, status: int, data: dict):
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class StubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Stub)
        self.api_key, self.requests, self.finished, self.disconnected = None, [], 0, 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


@pytest.fixture(scope="module")
def server():
    stub = StubServer()
    thread = threading.Thread(target=stub.serve_forever, daemon=True)
    thread.start()
    yield stub
    stub.shutdown()
    stub.server_close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra's playwright drives the browser")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    server.api_key, server.requests[:] = None, []
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url)
    page.wait_for_function("document.getElementById('model').textContent === 'stub-model'")
    yield page
    context.close()
    assert not errors, errors


def ask(page, text: str):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def answers(page) -> list[str]:
    return page.locator(".message.assistant").all_text_contents()


def test_a_streamed_answer_is_shown_as_sent(page, server):
    page.fill("#temperature", "0")
    page.fill("#seed", "7")
    ask(page, "What is the capital of France?")
    page.wait_for_function("document.getElementById('send').disabled === false "
                           "&& document.querySelectorAll('.message.assistant').length === 1")
    assert answers(page) == ["".join(ANSWER)]
    assert page.locator(".message.user").all_text_contents() == ["What is the capital of France?"]
    assert page.text_content("#speed").startswith(f"{len(ANSWER)} tokens, ")
    assert "tokens/s" in page.text_content("#speed")
    sent = server.requests[-1]["body"]
    assert sent["stream"] is True and sent["model"] == "stub-model"
    assert (sent["temperature"], sent["seed"], sent["top_p"], sent["top_k"], sent["max_tokens"]) == (0, 7, 0.95, 64, 256)
    assert "response_format" not in sent
    # the next turn carries the conversation
    ask(page, "And of Italy?")
    page.wait_for_function("document.querySelectorAll('.message.assistant').length === 2 "
                           "&& document.getElementById('send').disabled === false")
    assert [m["role"] for m in server.requests[-1]["body"]["messages"]] == ["user", "assistant", "user"]


def test_stop_ends_a_long_answer(page, server):
    ask(page, "Tell me something long")
    page.wait_for_function("document.querySelector('.message.assistant').textContent.split('word').length > 5")
    page.click("#stop")
    page.wait_for_function("document.getElementById('send').disabled === false")
    partial = answers(page)[0]
    time.sleep(0.3)
    assert answers(page)[0] == partial, "the answer still grew after stop"
    assert "".join(LONG).startswith(partial) and len(partial) < len("".join(LONG))
    assert page.locator(".message.assistant.stopped").count() == 1
    assert page.is_disabled("#stop")
    deadline = time.monotonic() + 5
    while server.disconnected == 0 and time.monotonic() < deadline:  # the stub notices at its next write
        time.sleep(0.05)
    assert server.disconnected == 1


def test_a_bad_setting_shows_the_servers_error(page, server):
    page.fill("#temperature", "5")
    ask(page, "Hello")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error") == "temperature: Input should be less than or equal to 2 (got 5)"
    assert page.input_value("#prompt") == "Hello"  # back in the box, to send again
    assert answers(page) == [] and page.locator(".message.user").count() == 0
    page.fill("#temperature", "1")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.message.assistant').length === 1 "
                           "&& document.getElementById('send').disabled === false")
    assert page.is_hidden("#error") and answers(page) == ["".join(ANSWER)]


def test_the_json_schema_box_sends_a_response_format(page, server):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    page.fill("#schema", "{not json")
    ask(page, "Where?")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error").startswith("JSON schema: not valid JSON")
    assert server.requests == []
    page.fill("#schema", json.dumps(schema))
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.message.assistant').length === 1 "
                           "&& document.getElementById('send').disabled === false")
    assert server.requests[-1]["body"]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "schema", "schema": schema, "strict": True}}


def test_the_api_key_is_asked_once(browser, server):
    server.api_key, server.requests[:] = "sesame", []
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(server.url)
        page.wait_for_selector("#key-form:not([hidden])")  # GET /v1/models answered 401
        page.fill("#api-key", "wrong")
        page.click("#key-form button")
        ask(page, "Hi")
        page.wait_for_selector("#key-form:not([hidden])")
        assert page.input_value("#prompt") == "Hi"
        page.fill("#api-key", "sesame")
        page.click("#key-form button")  # the message is sent again with the key
        page.wait_for_function("document.querySelectorAll('.message.assistant').length === 1 "
                               "&& document.getElementById('send').disabled === false")
        assert answers(page) == ["".join(ANSWER)]
        assert page.evaluate("sessionStorage.getItem('gemma-deploy-api-key')") == "sesame"
        ask(page, "Again")
        page.wait_for_function("document.querySelectorAll('.message.assistant').length === 2 "
                               "&& document.getElementById('send').disabled === false")
        assert page.is_hidden("#key-form")
        assert server.requests[-1]["authorization"] == "Bearer sesame"
    finally:
        context.close()
        server.api_key = None
