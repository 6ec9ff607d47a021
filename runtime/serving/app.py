"""The OpenAI-compatible app (FastAPI): it parses, checks, queues, and streams what the scheduler hands back.

    app = create_app("artifacts/serve", ServeOptions(max_batch_size=8))   an ASGI app to mount or serve
    POST /v1/completions, /v1/chat/completions     `stream: true` as server-sent events ending in `data: [DONE]`
    POST /v1/responses                             OpenAI's Responses API, stateless (runtime/serving/responses.py)
    GET  /v1/models, /health (200 once the model is loaded and the scheduler runs, 503 before), /metrics
    GET  /                                         a chat page (runtime/serving/static)

The HTTP layer never touches the backend: every request goes to the scheduler (scheduler.py), whose thread hands its
events to the request's asyncio queue. A client that disconnects, streaming or not, cancels its request, which frees
its row at the next step. Every failure is OpenAI's error body (`{"error": {...}}`), never a bare 500: bad input a
400 naming the field, an unknown model or path 404, a wrong method 405, a missing or wrong API key 401 (/health and
/metrics stay open), a full queue 429 with Retry-After, a body over `max_body_bytes` 413 (counted as it streams in,
chunked or not), a body slower than `body_timeout` 408. Tokenizing and the chat template run off the event loop.
The model loads in a thread when the app starts, so /health answers 503 meanwhile.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..params import ParamError
from .metrics import Metrics
from .options import API_KEY_ENV, ServeOptions
from .protocol import (APIError, ChatRequest, CompletionRequest, Unsupported, api_name, chat_logprobs,
                       completion_logprobs, new_id, now, usage)
from .responses import ResponsesRequest
from .scheduler import Failed, Finished, Output, Piece, QueueFull, Scheduler

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
INVALID_JSON = "the body is not a valid JSON object: send one (UTF-8, Content-Type: application/json)"


class State:
    """The loaded model and its scheduler, or why not yet."""

    def __init__(self, artifact: Path, options: ServeOptions, model_name: str):
        self.artifact, self.options = artifact, options
        self.metrics = Metrics(model_name)
        self.model = self.scheduler = None
        self.tool_format, self.native_tools = None, False  # runtime/serving/tools.py, from the artifact once loaded
        self.error: str | None = None
        self.loaded = threading.Event()

    def load(self) -> None:
        from ..model import load
        from . import tools

        try:
            model = load(self.artifact, self.options.load)
            self.scheduler = Scheduler(model, self.options, self.metrics).start()
            self.scheduler.warm_grammar()
            self.tool_format = tools.detect_format(model.tokenizer.token_id)
            self.native_tools = model.chat_template is not None and tools.template_renders_tools(model.chat_template)
            self.model = model
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.error("cannot serve %s: %s", self.artifact, self.error)
        finally:
            self.loaded.set()

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and self.scheduler.alive


def create_app(artifact: str | Path, options: ServeOptions | None = None, load_now: bool = False) -> FastAPI:
    """The ASGI app serving `artifact`. The model loads in a thread at start-up (`load_now`: before returning)."""
    options = options or ServeOptions()
    model_name = options.model_name or Path(artifact).resolve().name
    state = State(Path(artifact), options, model_name)
    api_key = options.api_key or os.environ.get(API_KEY_ENV) or None
    if load_now:
        state.load()

    @asynccontextmanager
    async def lifespan(app):
        if not state.loaded.is_set():
            threading.Thread(target=state.load, name="gemma-load", daemon=True).start()
        yield
        if state.scheduler is not None:  # uvicorn has let the requests under way finish (its graceful shutdown)
            await asyncio.to_thread(state.scheduler.stop)

    app = FastAPI(title="gemma-deploy", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.gemma = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return _error_response(_validation_error(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):  # no such path (404), wrong method (405)...
        message = {400: INVALID_JSON,  # a body FastAPI cannot decode (not UTF-8)
                   404: f"no route {request.url.path}; this server serves /v1/completions, /v1/chat/completions, "
                        "/v1/responses, /v1/models, /health, /metrics and its chat page at /",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, error.detail)
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return _error_response(APIError(error.status_code, message, code=code, headers=dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):  # a bug: the body says so, the log has the traceback
        log.error("unexpected failure on %s", request.url.path, exc_info=error)
        return _error_response(APIError(500, f"internal error: {type(error).__name__}", type="server_error"))

    app.add_middleware(_Guard, state=state, api_key=api_key, options=options)

    @app.get("/health")
    async def health():
        if state.ready:
            return {"status": "ok"}
        status = "error: " + state.error if state.error else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": now(),
                                            "owned_by": "gemma-deploy"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _ready(state, body.model, model_name)
        prepared = await asyncio.to_thread(_prepared, state, body, _completion_prompt)
        return await _serve(state, request, body, prepared, model_name)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _ready(state, body.model, model_name)
        prepared = await asyncio.to_thread(_prepared, state, body, _chat_prompt)
        return await _serve(state, request, body, prepared, model_name)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        _ready(state, body.model, model_name)
        return await _serve_response(state, request, body, model_name)

    # The chat page: its three files at / (no API key: the page asks for it on a 401). Routes, not a mount at /,
    # which would answer every other path (a GET on /v1/completions would be a 404 instead of a 405).
    for name, media_type in PAGE.items():
        app.add_api_route("/" if name == "index.html" else f"/{name}", _page_file(name, media_type), methods=["GET"],
                          include_in_schema=False)
    return app


PAGE = {"index.html": "text/html; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
        "chat.css": "text/css; charset=utf-8"}


def _page_file(name: str, media_type: str):
    body = (Path(__file__).with_name("static") / name).read_bytes()

    async def page():
        return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return page


class Prepared:
    """A request made ready for the scheduler off the event loop: its prompt's ids, its Output (a compiled grammar,
    special tokens, end tokens) and its tools (runtime/serving/tools.py), if any."""

    def __init__(self, ids: list[int], output: Output, tools=None):
        self.ids, self.output, self.tools = ids, output, tools


def _prepared(state: State, body, prompt) -> Prepared:
    """Tokenize (the chat template and the tools rendered first), compile the constraint; every refusal an APIError
    naming the request's field. Runs in a worker thread."""
    from . import grammar, tools

    try:
        ids, request_tools = prompt(state, body)
        spec = grammar.spec_from_request(body.model_dump())
        forced = tools.forced_spec(state.tool_format, request_tools) if request_tools is not None else None
        if spec is not None and forced is not None:
            raise APIError(400, "tool_choice forces a call, which response_format would constrain too: send one",
                           param="response_format")
        spec = spec or forced
        if spec is not None and body.ignore_eos:
            raise APIError(400, "ignore_eos goes on past the end a grammar needs: drop it", param="ignore_eos")
        compiled = grammar.compile(spec, state.scheduler.grammar_info) if spec is not None else None
    except ParamError as e:
        raise _param_error(body, e) from None
    except (grammar.GrammarError, tools.ToolError) as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None
    except ImportError as e:  # llguidance is in the serve extra
        raise APIError(400, f"structured outputs need llguidance: pip install 'gemma-deploy[serve]' ({e})",
                       param="response_format") from None
    native = request_tools is not None and request_tools.active and isinstance(state.tool_format, tools.Native)
    end = tuple(i for t in (state.tool_format.end_tokens if native else ())
                for i in [state.model.tokenizer.token_id(t)] if i is not None)
    return Prepared(ids, Output(compiled, special_tokens=native, end_tokens=end), request_tools)


def _completion_prompt(state: State, body: CompletionRequest):
    prompt = body.prompt_text()
    if prompt is not None:
        return state.model.tokenizer.encode(prompt), None
    vocab = state.model.manifest.model.vocab_size
    if any(not 0 <= t < vocab for t in body.prompt):
        raise APIError(400, f"prompt: token ids must be in 0..{vocab - 1}", param="prompt")
    return list(body.prompt), None


def _chat_prompt(state: State, body: ChatRequest):
    from . import tools

    model = state.model
    request_tools = tools.check_tools(body.tools, body.tool_choice)
    messages, variables = tools.prompt_messages(state.tool_format, [m.as_template_message() for m in body.messages],
                                                request_tools, state.native_tools)
    try:
        rendered = model.apply_chat_template(messages, **variables)
    except ValueError as e:  # a template's raise_exception (roles that do not alternate...)
        raise APIError(400, str(e), param="messages") from None
    return model.tokenizer.encode(rendered, add_special_tokens=False), request_tools


def _checked(body, make):
    """`make()`, its ParamError a 400 naming the request's field."""
    try:
        return make()
    except ParamError as e:
        raise _param_error(body, e) from None


def _param_error(body, error: ParamError) -> APIError:
    param = api_name(body, error.param)
    return APIError(400, error.named(param), param=param, code=error.code)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/models", "/health", "/metrics", "/")


class _Guard:
    """ASGI middleware (pure, so that streams and disconnects pass through untouched). On /v1/: the API key, then the
    body read whole before anything parses it, within `max_body_bytes` and `body_timeout` whatever its framing
    (Content-Length or chunked). Every response is counted by route and status, and given the extra headers."""

    def __init__(self, app, state: State, api_key: str | None, options: ServeOptions):
        self.app, self.state, self.options = app, state, options
        self.api_key = api_key.encode() if api_key else None
        self.headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in options.response_headers]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = 500

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        try:
            if path.startswith("/v1/"):
                error = self._unauthorized(scope)
                if error is None:
                    body, error = await self._read_body(receive)
                if error is not None:
                    return await _error_response(error)(scope, receive, send_with_headers)
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_headers)
        finally:
            self.state.metrics.request(path if path in _ROUTES else "other", status)

    def _unauthorized(self, scope) -> APIError | None:
        if self.api_key is None:
            return None
        given = dict(scope["headers"]).get(b"authorization", b"")  # bytes: a header need not be UTF-8
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key):
            return None
        return APIError(401, f"missing or wrong API key: send Authorization: Bearer <key> (the server's --api-key or "
                             f"{API_KEY_ENV})", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, receive) -> tuple[bytes, APIError | None]:
        limit, chunks, size = self.options.max_body_bytes, [], 0
        too_large = APIError(413, f"the request body is over {limit} bytes; send a smaller prompt",
                             code="request_too_large")

        async def read() -> APIError | None:
            nonlocal size
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return APIError(400, "the client went away before sending its body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return too_large
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return None

        try:
            error = await asyncio.wait_for(read(), self.options.body_timeout)
        except asyncio.TimeoutError:
            error = APIError(408, f"the request body did not arrive within {self.options.body_timeout:g} s; send it "
                                  "at once", code="request_timeout")
        return b"".join(chunks), error


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body read already, then waits for the client's disconnect."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _ready(state: State, asked: str, model_name: str):
    if not state.ready:
        message = f"the model is not loaded ({state.error})" if state.error else "the model is still loading"
        raise APIError(503, message + "; try again once GET /health answers 200", type="server_error",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if asked != model_name:
        raise APIError(404, f"model {asked!r} does not exist; this server serves {model_name!r} (GET /v1/models)",
                       param="model", code="model_not_found")
    return state.model


def _validation_error(error: RequestValidationError) -> APIError:
    first = error.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, Unsupported):
        return APIError(400, f"{cause.param}: {cause}", param=cause.param, code="unsupported")
    if first.get("type") in ("json_invalid", "model_attributes_type") or first.get("loc") == ("body",):
        return APIError(400, INVALID_JSON, code="invalid_json")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}" + (f" (got {first['input']!r})" if "input" in first else "")
    return APIError(400, message + "; see the OpenAI API's reference for the field", param=param,
                    code="invalid_value")


class _Events:
    """The scheduler's events for one request, handed from its thread to this request's event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self):
        return await self.queue.get()


def _submit(state: State, body, prepared: Prepared, events: "_Events"):
    """The request's choices queued with the scheduler; its params. 429 when full, 400 naming the field."""
    params = _checked(body, body.to_params)
    try:
        return state.scheduler.submit(prepared.ids, params, events, body.n, prepared.output), params
    except QueueFull as e:
        raise APIError(429, f"{e}; retry after {RETRY_AFTER_SECONDS} s", type="rate_limit_error",
                       code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    except ParamError as e:  # n, or a prompt over the context (ContextLengthError)
        raise _param_error(body, e) from None


async def _serve(state: State, request: Request, body, prepared: Prepared, model_name: str):
    events = _Events()
    jobs, params = _submit(state, body, prepared, events)
    reply = _Reply(isinstance(body, ChatRequest), model_name, state.model.tokenizer, body.n,
                   params.logprobs is not None, state.tool_format, prepared.tools)
    if body.stream:
        return StreamingResponse(_stream(state.scheduler, jobs, events, reply, body.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    if not await _collect(state.scheduler, jobs, events, request, reply):
        return Response(status_code=499)  # the client went away: nothing to answer, the rows freed at the next step
    return reply.whole()


async def _collect(scheduler, jobs, events: "_Events", request: Request, reply) -> bool:
    """A whole response's events, into `reply.add`, until it is done; False if the client went away first (the
    request is then cancelled)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while not reply.done:
            event = asyncio.ensure_future(events.get())
            await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                event.cancel()
                scheduler.cancel(jobs)
                return False
            failed = reply.add(event.result())
            if failed is not None:
                scheduler.cancel(jobs)
                raise APIError(500, f"generation failed: {failed.message}", type="server_error")
        return True
    except asyncio.CancelledError:
        scheduler.cancel(jobs)
        raise
    finally:
        gone.cancel()


# -- /v1/responses: a chat request underneath (runtime/serving/responses.py) -------------------------------------


async def _serve_response(state: State, request: Request, body, model_name: str):
    from . import responses, tools

    chat = _checked(body, lambda: responses.to_chat(body))
    as_chat = ChatRequest.model_validate({
        "model": body.model, "messages": chat.messages, "tools": chat.tools, "tool_choice": chat.tool_choice,
        "response_format": chat.response_format, "max_tokens": chat.max_tokens,
        **({"ignore_eos": body.ignore_eos} if body.ignore_eos is not None else {})})
    try:
        prepared = await asyncio.to_thread(_prepared, state, as_chat, _chat_prompt)
    except APIError as e:  # named as a chat request names it: rename for this one
        e.param = body.api_name(e.param) if e.param else e.param
        e.message = e.message.replace("response_format", "text.format")
        raise
    events = _Events()
    jobs, _ = _submit(state, body, prepared, events)
    out = responses.ResponseBuilder(model_name, body)
    active = prepared.tools is not None and prepared.tools.active
    stream = tools.ToolStream(state.tool_format, prepared.tools) if active else None
    if body.stream:
        return StreamingResponse(_response_events(state.scheduler, jobs, events, out, stream),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    reply = _Reply(True, model_name, state.model.tokenizer, 1, False)
    if not await _collect(state.scheduler, jobs, events, request, reply):
        return Response(status_code=499)
    text = "".join(p.text for p in reply.pieces[0])
    parsed = tools.parse_reply(state.tool_format, text, prepared.tools) if active else None
    return out.whole(parsed.content if parsed else text, parsed.tool_calls if parsed else [], reply.finished[0])


async def _response_events(scheduler, jobs, events: "_Events", out, stream):
    """The Responses API's typed events for one request (no [DONE]: the last is response.completed)."""
    try:
        for event in out.start():
            yield event
        while True:
            event = await events.get()
            if isinstance(event, Piece):
                pieces = out.add(*stream.push(event.text)) if stream else out.add(event.text, [])
            elif isinstance(event, Finished):
                pieces = (out.add(*stream.finish()) if stream else []) + out.end(event)
            else:
                pieces = out.fail(f"generation failed: {event.message}")
            for piece in pieces:
                yield piece
            if not isinstance(event, Piece):
                break
    finally:
        scheduler.cancel(jobs)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body was read already: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(scheduler, jobs, events: _Events, reply: "_Reply", include_usage: bool):
    """Server-sent events: a chunk per piece, each choice's finish reason, the usage if asked, then [DONE]. A client
    that disconnects cancels the request (the response is cancelled, and this generator closed)."""
    try:
        if reply.chat:
            for index in range(reply.n):
                yield _sse(reply.chunk(index, {"role": "assistant", "content": ""}))
        while not reply.done:
            event = await events.get()
            failed = reply.add(event, keep=False)
            if failed is not None:
                yield _sse({"error": {"message": f"generation failed: {failed.message}", "type": "server_error",
                                      "param": None, "code": None}})
                break
            if isinstance(event, Piece):
                for chunk in reply.chunks(event.index, piece=event):
                    yield _sse(chunk)
            elif isinstance(event, Finished):
                for chunk in reply.chunks(event.index, reason=event.reason):
                    yield _sse(chunk)
        if include_usage and reply.done:
            yield _sse({**reply.chunk(0, {}), "choices": [], "usage": reply.usage()})
        yield "data: [DONE]\n\n"
    finally:
        scheduler.cancel(jobs)  # a no-op once finished; frees the rows of a client that went away


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Reply:
    """The response objects of one request (n choices), completion or chat, whole or in chunks. With tools, each
    choice's text goes through a tools.ToolStream: its calls come out as `tool_calls` (deltas when streaming)."""

    def __init__(self, chat: bool, model_name: str, tokenizer, n: int, with_logprobs: bool, tool_format=None,
                 tools=None):
        from . import tools as tool_calls

        self.chat, self.model_name, self.tokenizer, self.n = chat, model_name, tokenizer, n
        self.with_logprobs = with_logprobs
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), now()
        self.pieces: list[list[Piece]] = [[] for _ in range(n)]
        self.finished: list[Finished | None] = [None] * n
        self.offsets = [0] * n  # text emitted so far per choice (completions' logprobs text_offset)
        active = tools is not None and tools.active
        self.streams = [tool_calls.ToolStream(tool_format, tools) for _ in range(n)] if active else None
        self.called = [False] * n

    @property
    def done(self) -> bool:
        return all(self.finished)

    def add(self, event, keep: bool = True) -> Failed | None:
        if isinstance(event, Piece) and keep:
            self.pieces[event.index].append(event)
        elif isinstance(event, Finished):
            self.finished[event.index] = event
        elif isinstance(event, Failed):
            return event
        return None

    def _decode(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _logprobs(self, pieces, index: int):
        if not self.with_logprobs:
            return None
        if self.chat:
            return chat_logprobs(pieces, self._decode)
        return completion_logprobs(pieces, self._decode, self.offsets[index])

    def usage(self) -> dict:
        first = self.finished[0]
        return usage(first.prompt_tokens, sum(f.completion_tokens for f in self.finished), first.cached_tokens)

    def whole(self) -> dict:
        choices = []
        for index, (pieces, finished) in enumerate(zip(self.pieces, self.finished)):
            text = "".join(p.text for p in pieces)
            reason = _reason(finished.reason)
            choice = {"index": index, "logprobs": self._logprobs(pieces, index)}
            if not self.chat:
                choice["text"] = text
            elif self.streams is None:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                stream = self.streams[index]
                stream.push(text)
                stream.finish()
                parsed = stream.reply()
                choice["message"] = {"role": "assistant", "content": parsed.content,
                                     **({"tool_calls": parsed.tool_calls} if parsed.tool_calls else {})}
                reason = parsed.finish_reason or reason
            choices.append({**choice, "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": choices, "usage": self.usage()}

    def chunks(self, index: int, piece: Piece | None = None, reason: str | None = None) -> list[dict]:
        """The streamed chunks of choice `index` for a Piece, or for its finish (`reason`)."""
        logprobs = self._logprobs([piece], index) if piece is not None and piece.logprobs else None
        if piece is not None:
            self.offsets[index] += len(piece.text)
        if not self.chat:
            return [self._chunk(index, {"text": piece.text if piece is not None else "", "logprobs": logprobs},
                                reason)]
        if self.streams is None:
            delta = {"content": piece.text} if piece is not None else {}
            return [self._chunk(index, {"delta": delta, "logprobs": logprobs}, reason)]
        stream = self.streams[index]
        content, calls = stream.push(piece.text) if piece is not None else stream.finish()
        out = []
        if content:
            out.append(self._chunk(index, {"delta": {"content": content}, "logprobs": logprobs}, None))
        if calls:
            self.called[index] = True
            out.append(self._chunk(index, {"delta": {"tool_calls": calls}, "logprobs": None}, None))
        if reason is not None:
            final = "tool_calls" if self.called[index] else _reason(reason)
            out.append({**self._chunk(index, {"delta": {}, "logprobs": None}, None),
                        "choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": final}]})
        return out

    def chunk(self, index: int, delta: dict) -> dict:
        """A chat's opening chunk (its `delta`), or the frame of the usage chunk."""
        return self._chunk(index, {"delta": delta, "logprobs": None}, None)

    def _chunk(self, index: int, fields: dict, reason: str | None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name,
                "choices": [{"index": index, **fields, "finish_reason": _reason(reason)}]}


def _reason(reason: str | None) -> str | None:
    return None if reason is None else "stop" if reason == "cancelled" else reason
