"""Execution backends: each owns a session and the KV cache buffers (see base.Backend)."""

from .base import Backend

__all__ = ["Backend"]
