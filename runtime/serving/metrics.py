"""The server's Prometheus metrics (prometheus_client), in a registry of their own: GET /metrics.

    gemma_requests_total{endpoint, status}        every HTTP request, by route and status code
    gemma_requests_finished_total{reason}         completions by how they ended: stop, length, cancelled
    gemma_prompt_tokens_total, gemma_generation_tokens_total
    gemma_queue_depth, gemma_running_rows         requests waiting, and rows of the batch in use
    gemma_time_to_first_token_seconds             from arrival to the first token (histogram)
    gemma_inter_token_latency_seconds             between a request's tokens (histogram)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds; a decode step of the real 270M is tens of milliseconds, a prefill of 2k tokens a few seconds
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("gemma_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
        self.finished_requests = Counter("gemma_requests_finished", "Completions by how they ended", ["reason"],
                                         registry=registry)
        self.prompt_tokens = Counter("gemma_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.generation_tokens = Counter("gemma_generation_tokens", "Tokens generated", registry=registry)
        self.queue_depth = Gauge("gemma_queue_depth", "Requests waiting for a row", registry=registry)
        self.running_rows = Gauge("gemma_running_rows", "Rows of the batch in use", registry=registry)
        self.ttft = Histogram("gemma_time_to_first_token_seconds", "Arrival to first token", buckets=TTFT_BUCKETS,
                              registry=registry)
        self.itl = Histogram("gemma_inter_token_latency_seconds", "Between a request's tokens", buckets=ITL_BUCKETS,
                             registry=registry)

    # called by the scheduler's thread (prometheus_client's metrics are thread-safe)
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_latency(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, reason: str, prompt_tokens: int, generated: int) -> None:
        self.finished_requests.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)

    def rows(self, running: int, queued: int) -> None:
        self.running_rows.set(running)
        self.queue_depth.set(queued)

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
