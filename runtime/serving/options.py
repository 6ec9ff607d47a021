"""How `gemma-run serve` runs an artifact: the one place its options' defaults are set (imports nothing heavy)."""

from __future__ import annotations

from dataclasses import dataclass, field

API_KEY_ENV = "GEMMA_DEPLOY_API_KEY"
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens a step prefills: the decoding rows wait for one chunk at most


@dataclass
class ServeOptions:
    max_batch_size: int = 8  # rows decoded together
    max_queue: int = 64  # requests waiting for a row; one more is a 429
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    api_key: str | None = None  # None: GEMMA_DEPLOY_API_KEY, else no key
    model_name: str | None = None  # None: the artifact folder's name
    backend: str = "auto"
    provider: str = "cpu"
    threads: int | None = None
    allow_cpu_fallback: bool = False
    max_body_bytes: int = 1 << 20  # a request body over this is a 413
    response_headers: dict = field(default_factory=dict)  # added to every response (Ray's x-gemma-replica)
