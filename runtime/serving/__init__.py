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
    `grace_seconds`), and return."""
    import signal

    import uvicorn

    app = create_app(artifact, options)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_seconds,
                            lifespan="on")
    log.warning("serving %s on http://%s:%d", artifact, host, port)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it found: with this
    # one the process exits 0 instead of dying of it (which a service manager would count as a crash).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
