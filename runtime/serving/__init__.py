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
    import uvicorn

    app = create_app(artifact, options)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_seconds,
                            lifespan="on")
    log.warning("serving %s on http://%s:%d", artifact, host, port)
    uvicorn.Server(config).run()
