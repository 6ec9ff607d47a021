"""The OpenAI-compatible app (FastAPI): it parses, checks, queues, and streams what the scheduler hands back.

    app = create_app("artifacts/gemma3-270m-static", max_batch_size=8)   an ASGI app to mount or serve
    POST /v1/completions, /v1/chat/completions     `stream: true` as server-sent events ending in `data: [DONE]`
    GET  /v1/models, /health (200 once the model is loaded and the scheduler runs, 503 before), /metrics

The HTTP layer never touches the backend: every request goes to the scheduler (scheduler.py), whose thread
hands its events to the request's asyncio queue. A client that disconnects cancels its request, which frees
its row at the next step. Bad input is a 400 with OpenAI's error body naming the field; an unknown model 404;
a missing or wrong API key 401 (/health and /metrics stay open); a full queue 429 with Retry-After; a body over
`max_body_bytes` 413. The model loads in a thread when the app starts, so /health answers 503 meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .metrics import Metrics
from .options import API_KEY_ENV, ServeOptions
from .protocol import (APIError, ChatRequest, CompletionRequest, Unsupported, chat_logprobs, completion_logprobs,
                       new_id, now, usage)
from .scheduler import Failed, Finished, Piece, QueueFull, Scheduler

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat goes on to the context


class State:
    """The loaded model and its scheduler, or why not yet."""

    def __init__(self, artifact: Path, options: ServeOptions):
        self.artifact, self.options = artifact, options
        self.metrics = Metrics()
        self.model = self.scheduler = None
        self.error: str | None = None
        self.loaded = threading.Event()

    def load(self) -> None:
        from ..model import load

        try:
            o = self.options
            model = load(self.artifact, provider=o.provider, allow_cpu_fallback=o.allow_cpu_fallback,
                         threads=o.threads, backend=o.backend)
            self.scheduler = Scheduler(model, o.max_batch_size, o.max_queue, o.prefill_chunk, self.metrics).start()
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
    state = State(Path(artifact), options)
    model_name = options.model_name or Path(artifact).resolve().name
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
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return JSONResponse(_validation_error(error).body(), status_code=400)

    app.add_middleware(_Guard, state=state, api_key=api_key, max_body_bytes=options.max_body_bytes,
                       headers=options.response_headers)

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
        model = _ready(state, body.model, model_name)
        prompt = body.prompt
        ids = list(prompt) if isinstance(prompt, list) else model.tokenizer.encode(prompt)
        max_tokens = body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        return await _serve(state, request, body, ids, max_tokens, body.logprobs, chat=False, model_name=model_name)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        model = _ready(state, body.model, model_name)
        messages = [m.as_template_message() for m in body.messages]
        try:
            rendered = model.apply_chat_template(messages)
        except ValueError as e:  # a template's raise_exception (roles that do not alternate...)
            raise APIError(400, str(e), param="messages") from None
        ids = model.tokenizer.encode(rendered, add_special_tokens=False)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(model.context_length - len(ids), 1)
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await _serve(state, request, body, ids, max_tokens, top, chat=True, model_name=model_name)

    return app


_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _Guard:
    """ASGI middleware (pure, so that streams and disconnects pass through untouched): the API key and the body's
    size before anything is parsed on /v1/; every response counted by route and status, and given the extra
    headers."""

    def __init__(self, app, state: State, api_key: str | None, max_body_bytes: int, headers: dict):
        self.app, self.state, self.api_key, self.max_body_bytes = app, state, api_key, max_body_bytes
        self.headers = [(k.lower().encode(), str(v).encode()) for k, v in headers.items()]

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
            error = self._refuse(scope) if path.startswith("/v1/") else None
            if error is not None:
                response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
                return await response(scope, receive, send_with_headers)
            await self.app(scope, receive, send_with_headers)
        finally:
            self.state.metrics.request(path if path in _ROUTES else "other", status)

    def _refuse(self, scope) -> APIError | None:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return APIError(401, "missing or wrong API key: send Authorization: Bearer <key> (the server's "
                                 f"--api-key or {API_KEY_ENV})", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return APIError(413, f"the request body is over {self.max_body_bytes} bytes; send a smaller prompt",
                            code="request_too_large")
        return None


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
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return APIError(400, "the body is not valid JSON: send a JSON object (Content-Type: application/json)",
                        code="invalid_json")
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}" + (f" (got {first['input']!r})" if "input" in first and param else "")
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


async def _serve(state: State, request: Request, body, ids: list[int], max_tokens: int, logprobs, chat: bool,
                 model_name: str):
    scheduler, model = state.scheduler, state.model
    if any(not isinstance(t, int) or not 0 <= t < model.manifest.model.vocab_size for t in ids):
        raise APIError(400, f"prompt: token ids must be in 0..{model.manifest.model.vocab_size - 1}", param="prompt")
    events = _Events()
    try:
        job = scheduler.submit(ids, body.generation_options(max_tokens), events, logprobs, body.ignore_eos)
    except QueueFull as e:
        raise APIError(429, f"{e}; retry after {RETRY_AFTER_SECONDS} s", type="rate_limit_error",
                       code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    except ValueError as e:  # the options, or a prompt over the context (ContextLengthError)
        param = "max_tokens" if "max_new_tokens" in str(e) else "messages" if chat else "prompt"
        raise APIError(400, str(e).replace("max_new_tokens", "max_tokens"), param=param,
                       code="context_length_exceeded" if "context" in str(e) or "fit" in str(e) else None) from None
    reply = _Reply(chat, model_name, model.tokenizer)
    if body.stream:
        return StreamingResponse(_stream(scheduler, job, events, reply, body.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    pieces = []
    try:
        while True:
            event = await _next_or_disconnect(events, request)
            if event is None:  # the client went away: nothing to answer
                scheduler.cancel(job)
                return Response(status_code=499)
            if isinstance(event, Piece):
                pieces.append(event)
            elif isinstance(event, Failed):
                raise APIError(500, f"generation failed: {event.message}", type="server_error")
            elif isinstance(event, Finished):
                return reply.whole(pieces, event, logprobs is not None)
    except asyncio.CancelledError:
        scheduler.cancel(job)
        raise


async def _next_or_disconnect(events: _Events, request: Request, poll: float = 0.5):
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=poll)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None


async def _stream(scheduler, job, events: _Events, reply: "_Reply", include_usage: bool):
    """Server-sent events: a chunk per piece, the finish reason, the usage if asked, then [DONE]. A client that
    disconnects cancels the request (the response is cancelled, and this generator closed)."""
    try:
        if reply.chat:
            yield _sse(reply.chunk({"role": "assistant", "content": ""}, None))
        while True:
            event = await events.get()
            if isinstance(event, Piece):
                yield _sse(reply.chunk(event, None))
            elif isinstance(event, Failed):
                yield _sse({"error": {"message": f"generation failed: {event.message}", "type": "server_error",
                                      "param": None, "code": None}})
                break
            elif isinstance(event, Finished):
                yield _sse(reply.chunk(None, event.reason))
                if include_usage:
                    yield _sse({**reply.chunk(None, None), "choices": [],
                                "usage": usage(event.prompt_tokens, event.completion_tokens)})
                break
        yield "data: [DONE]\n\n"
    finally:
        scheduler.cancel(job)  # a no-op once finished; frees the row of a client that went away


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Reply:
    """The response objects of one request, completion or chat, whole or in chunks."""

    def __init__(self, chat: bool, model_name: str, tokenizer):
        self.chat, self.model_name, self.tokenizer = chat, model_name, tokenizer
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), now()
        self.offset = 0  # text emitted so far (completions' logprobs text_offset)

    def _decode(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _logprobs(self, pieces):
        if self.chat:
            return chat_logprobs(pieces, self._decode)
        return completion_logprobs(pieces, self._decode, self.offset)

    def whole(self, pieces, finished: Finished, with_logprobs: bool) -> dict:
        text = "".join(p.text for p in pieces)
        logprobs = self._logprobs(pieces) if with_logprobs else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": _reason(finished.reason)}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": _reason(finished.reason)}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": [choice],
                "usage": usage(finished.prompt_tokens, finished.completion_tokens)}

    def chunk(self, piece, reason: str | None) -> dict:
        """A streamed chunk: a Piece, a chat's opening role (a dict), or the finish reason (piece None)."""
        logprobs = self._logprobs([piece]) if isinstance(piece, Piece) and piece.logprobs else None
        if isinstance(piece, Piece):
            self.offset += len(piece.text)
        if self.chat:
            delta = piece if isinstance(piece, dict) else {"content": piece.text} if piece else {}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": _reason(reason)}
        else:
            choice = {"index": 0, "text": piece.text if piece else "", "logprobs": logprobs,
                      "finish_reason": _reason(reason)}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": [choice]}


def _reason(reason: str | None) -> str | None:
    return None if reason is None else "stop" if reason == "cancelled" else reason
