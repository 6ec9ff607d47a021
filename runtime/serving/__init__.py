"""Serving: an OpenAI-compatible server with continuous batching over a static-layout artifact.

    gemma-run serve DIR [--port 8000] [--max-batch-size 8]           the command
    runtime.serving.serve(DIR, host, port, ServeOptions(...))         the same from Python
    runtime.serving.create_app(DIR, ServeOptions(...))                the ASGI app, to mount (Ray Serve does)

Needs the `serve` extra (pip install "gemma-deploy[serve]": FastAPI, uvicorn, prometheus_client); the base
runtime imports none of it.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def create_app(artifact, options=None, load_now: bool = False):
    from .app import create_app as _create_app

    return _create_app(artifact, options, load_now)


def serve(artifact, host: str = "127.0.0.1", port: int = 8000, options=None, grace_seconds: float = 30.0) -> None:
    """Serve until SIGTERM or SIGINT: then stop accepting, let the requests under way finish (up to
    `grace_seconds`), and return. uvicorn's limits come from ServeOptions: connections at once
    (`max_connections`, then 503), idle keep-alive (`keep_alive`), and the headers' deadline (`header_timeout`)."""
    import signal

    import uvicorn

    from .options import ServeOptions

    options = options or ServeOptions()
    app = create_app(artifact, options)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_seconds,
                            lifespan="on", http=_timed_h11(options.header_timeout),
                            limit_concurrency=options.max_connections, timeout_keep_alive=options.keep_alive)
    log.warning("serving %s on http://%s:%d", artifact, host, port)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it found: with this
    # one the process exits 0 instead of dying of it (which a service manager would count as a crash).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _timed_h11(seconds: float):
    """uvicorn's h11 protocol with a deadline for a connection's first request headers: uvicorn has none, so a client
    sending them a byte at a time would hold a connection for ever (later requests on it have uvicorn's keep-alive
    deadline)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.loop.call_later(seconds, self._headers_due)

        def _headers_due(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                log.info("closing a connection that sent no request headers within %g s", seconds)
                self.transport.close()

    return TimedH11
