"""The server's Prometheus metrics (prometheus_client), in a registry of their own: GET /metrics.

    gemma_requests_total{endpoint, status}          every HTTP request, by route and status code
    gemma_requests_finished_total{reason}           completions by how they ended: stop, length, cancelled
    gemma_prompt_tokens_total, gemma_generation_tokens_total
    gemma_queue_depth, gemma_running_rows           requests waiting, and rows of the batch in use
    gemma_kv_cache_usage_ratio                      rows in use / rows
    gemma_prefix_cache_queries_total                prompt tokens looked up in the prefix cache
    gemma_prefix_cache_hits_total                   of them, tokens whose KV was reused (in place or copied)
    gemma_time_to_first_token_seconds               from arrival to the first token (histogram)
    gemma_inter_token_latency_seconds               between a request's tokens (histogram)
    gemma_e2e_request_latency_seconds               from arrival to the end (histogram)
    gemma_request_prompt_tokens, gemma_request_generation_tokens   per request (histograms)
    gemma_spec_decode_num_drafts, _num_draft_tokens, _num_accepted_tokens      speculative decoding (and vLLM's
                                                    vllm:spec_decode_num_accepted_tokens_per_pos{position})

Where one of these means what a vLLM metric means, it is exported under vLLM's name too (`vllm:...`, with vLLM's
`model_name` label), so dashboards made for vLLM read this server: `VLLM_NAMES` lists them (docs/serving.md).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds; a decode step of the real 270M is tens of milliseconds, a prefill of 2k tokens a few seconds
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# our name -> vLLM's (the same meaning, vLLM's units)
VLLM_NAMES = {
    "gemma_running_rows": "vllm:num_requests_running",
    "gemma_queue_depth": "vllm:num_requests_waiting",
    "gemma_kv_cache_usage_ratio": "vllm:kv_cache_usage_perc",
    "gemma_prefix_cache_queries": "vllm:prefix_cache_queries",
    "gemma_prefix_cache_hits": "vllm:prefix_cache_hits",
    "gemma_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "gemma_inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "gemma_e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "gemma_request_prompt_tokens": "vllm:request_prompt_tokens",
    "gemma_request_generation_tokens": "vllm:request_generation_tokens",
    "gemma_spec_decode_num_drafts": "vllm:spec_decode_num_drafts",
    "gemma_spec_decode_num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "gemma_spec_decode_num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
}


class _Twin:
    """One of our metrics and, where vLLM has the same, vLLM's: updated together."""

    def __init__(self, kind, name: str, documentation: str, registry, model_name: str, **kwargs):
        self.ours = kind(name, documentation, registry=registry, **kwargs)
        self.theirs = None
        if name in VLLM_NAMES:
            self.theirs = kind(VLLM_NAMES[name], documentation, ["model_name"], registry=registry,
                               **kwargs).labels(model_name)

    def __getattr__(self, method):
        def call(*args):
            getattr(self.ours, method)(*args)
            if self.theirs is not None:
                getattr(self.theirs, method)(*args)

        return call


class Metrics:
    def __init__(self, model_name: str = "gemma"):
        self.registry = registry = CollectorRegistry()

        def twin(kind, name, documentation, **kwargs):
            return _Twin(kind, name, documentation, registry, model_name, **kwargs)

        self.requests = Counter("gemma_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
        self.finished_requests = Counter("gemma_requests_finished", "Completions by how they ended", ["reason"],
                                         registry=registry)
        self.prompt_tokens = Counter("gemma_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.generation_tokens = Counter("gemma_generation_tokens", "Tokens generated", registry=registry)
        self.queue_depth = twin(Gauge, "gemma_queue_depth", "Requests waiting for a row")
        self.running_rows = twin(Gauge, "gemma_running_rows", "Rows of the batch in use (a request each)")
        self.kv_usage = twin(Gauge, "gemma_kv_cache_usage_ratio", "Rows of the KV cache in use, 0 to 1")
        self.prefix_queries = twin(Counter, "gemma_prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = twin(Counter, "gemma_prefix_cache_hits", "Prompt tokens whose KV the prefix cache held")
        self.ttft = twin(Histogram, "gemma_time_to_first_token_seconds", "Arrival to first token", buckets=TTFT_BUCKETS)
        self.itl = twin(Histogram, "gemma_inter_token_latency_seconds", "Between a request's tokens",
                        buckets=ITL_BUCKETS)
        self.e2e = twin(Histogram, "gemma_e2e_request_latency_seconds", "Arrival to the end", buckets=E2E_BUCKETS)
        self.request_prompt = twin(Histogram, "gemma_request_prompt_tokens", "Prompt tokens per request",
                                   buckets=TOKEN_BUCKETS)
        self.request_generation = twin(Histogram, "gemma_request_generation_tokens", "Tokens generated per request",
                                       buckets=TOKEN_BUCKETS)

        self.drafts = twin(Counter, "gemma_spec_decode_num_drafts", "Speculative drafts verified")
        self.draft_tokens = twin(Counter, "gemma_spec_decode_num_draft_tokens", "Draft tokens proposed")
        self.accepted_tokens = twin(Counter, "gemma_spec_decode_num_accepted_tokens", "Draft tokens accepted")
        self.accepted_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by "
                                        "position in the draft", ["model_name", "position"], registry=registry)
        self.model_name = model_name

    # called by the scheduler's thread (prometheus_client's metrics are thread-safe)
    def speculated(self, draft: int, accepted: int) -> None:
        self.drafts.inc()
        self.draft_tokens.inc(draft)
        self.accepted_tokens.inc(accepted)
        for position in range(accepted):
            self.accepted_per_pos.labels(self.model_name, str(position)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_latency(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def prefix_query(self, tokens: int) -> None:
        self.prefix_queries.inc(tokens)

    def prefix_hit(self, tokens: int) -> None:
        if tokens:
            self.prefix_hits.inc(tokens)

    def finished(self, reason: str, prompt_tokens: int, generated: int, seconds: float) -> None:
        self.finished_requests.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        self.e2e.observe(seconds)
        self.request_prompt.observe(prompt_tokens)
        self.request_generation.observe(generated)

    def rows(self, running: int, queued: int, total: int) -> None:
        self.running_rows.set(running)
        self.queue_depth.set(queued)
        self.kv_usage.set(running / total if total else 0.0)

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
