"""`gemma-run bench`: what one artifact does on this machine, as figures (median of runs after warm-up).

Decode at short context is bound by reading the weights once per token: the report gives the weight
bytes read per token (the artifact's graph and external data), the read bandwidth measured here
(a plain numpy reduction over a large array, one thread, and a float32 matrix-vector product in
numpy's BLAS, all threads), the decode rate that the faster of the two allows, and the fraction of it
achieved. The loop's own cost is the time outside session.run per decode step.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .generate import generate_step
from .sampling import make_sampler

WEIGHT_FILES = ("model.onnx", "model.onnx.data")


def prompt_ids(model, length: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """Random ordinary tokens after <bos>: the content does not change the cost."""
    vocab = model.manifest.model.vocab_size
    rng = np.random.default_rng(seed)
    low = 1000 if vocab > 2000 else 3  # past the special tokens
    ids = rng.integers(low, min(vocab, 200_000), size=(batch_size, length), dtype=np.int64)
    ids[:, 0] = model.manifest.generation.bos_token_id
    return ids


def time_generation(model, ids: np.ndarray, new_tokens: int) -> dict:
    """One prefill and `new_tokens - 1` decode steps, greedy: wall times and the time inside run()."""
    backend = model.backend
    cache = model.new_cache(ids.shape[0], ids.shape[1] + new_tokens)
    stamps, inside = [], []
    start = time.perf_counter()
    for _ in generate_step(cache, ids, np.ones_like(ids), make_sampler(), new_tokens):
        stamps.append(time.perf_counter())
        inside.append(backend.run_seconds)
    steps = len(stamps) - 1
    decode_wall = stamps[-1] - stamps[0]
    outside = decode_wall - (inside[-1] - inside[0])
    return {
        "prefill_ms": 1000 * (stamps[0] - start),
        "decode_tokens_per_s": ids.shape[0] * steps / decode_wall if steps else 0.0,
        "step_ms": 1000 * decode_wall / steps if steps else 0.0,
        "overhead_ms": 1000 * outside / steps if steps else 0.0,
        "overhead_fraction": outside / decode_wall if steps else 0.0,
    }


def time_speculative(model, ids: np.ndarray, new_tokens: int, **speculative) -> dict:
    """time_generation's figures through the engine with speculative decoding, one row (ignore_eos: exactly
    `new_tokens` tokens), and the drafts' acceptance rate."""
    from .params import SamplingParams

    if ids.shape[0] != 1:
        raise ValueError("--speculative measures one row: drop --batch-size")
    engine = model.engine(**speculative)
    before = engine.spec_stats.num_draft_tokens, engine.spec_stats.num_accepted_tokens
    start, first = time.perf_counter(), None
    for _ in engine.generate(ids[0].tolist(), SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)):
        first = first or time.perf_counter()
    end = time.perf_counter()
    drafted = engine.spec_stats.num_draft_tokens - before[0]
    accepted = engine.spec_stats.num_accepted_tokens - before[1]
    return {"prefill_ms": 1000 * (first - start), "decode_tokens_per_s": (new_tokens - 1) / (end - first),
            "step_ms": 0.0, "overhead_ms": 0.0, "overhead_fraction": 0.0,
            "acceptance_rate": accepted / drafted if drafted else 0.0}


def _median_seconds(run, repeats: int) -> float:
    run()  # warm: page the memory in
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> dict:
    """Bytes/s read here: a plain numpy reduction (one thread) and a float32 matrix-vector product
    (BLAS, all threads), each over `megabytes` of float32, median of `repeats`."""
    data = np.ones(megabytes * 2**20 // 4, np.float32)
    plain = data.nbytes / _median_seconds(lambda: np.add.reduce(data), repeats)
    matrix = data.reshape(-1, 4096)
    vector = np.ones(4096, np.float32)
    matvec = data.nbytes / _median_seconds(lambda: matrix @ vector, repeats)
    return {"numpy_read": plain, "matvec_read": matvec}


def weight_bytes(model) -> int:
    """Bytes of the graph and its external data: what a decode step reads at least once."""
    files = model.manifest.files
    return sum(files[name].size for name in WEIGHT_FILES if name in files)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def benchmark(model, prompt_length: int, new_tokens: int, batch_size: int = 1, runs: int = 5, warmup: int = 1,
              bandwidth_mb: int = 256, **speculative) -> dict:
    """The figures of `gemma-run bench`, medians over `runs` after `warmup` unmeasured runs. With `speculative`
    (stream()'s keywords) through the engine: random prompt ids give n-gram drafts little to match, so this measures
    the machinery's cost; scripts/bench_speculative.py measures the gain on prompts that ground the output."""
    limit = model.context_length
    if prompt_length + new_tokens > limit:
        raise ValueError(f"--prompt-length {prompt_length} + --new-tokens {new_tokens} exceed the context of {limit}")
    ids = prompt_ids(model, prompt_length, batch_size)
    timed = (lambda: time_speculative(model, ids, new_tokens, **speculative)) if speculative else (
        lambda: time_generation(model, ids, new_tokens))
    for _ in range(warmup):
        timed()
    samples = [timed() for _ in range(runs)]
    median = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    bandwidth = read_bandwidth(bandwidth_mb)
    weights = weight_bytes(model)
    bound = max(bandwidth.values()) / weights  # tokens/s per row if each step only read the weights
    return {
        "artifact": str(model.manifest.folder),
        "dtype": model.manifest.precision.dtype,
        "kv_layout": model.backend.kv_layout,
        "provider": model.backend.provider,
        "prompt_length": prompt_length,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "runs": runs,
        "prefill_ms": round(median["prefill_ms"], 2),
        "decode_tokens_per_s": round(median["decode_tokens_per_s"], 2),
        "decode_step_ms": round(median["step_ms"], 3),
        "overhead_ms_per_step": round(median["overhead_ms"], 4),
        "overhead_percent": round(100 * median["overhead_fraction"], 2),
        "weight_bytes_per_token": weights,
        "numpy_read_gb_per_s": round(bandwidth["numpy_read"] / 1e9, 2),
        "matvec_read_gb_per_s": round(bandwidth["matvec_read"] / 1e9, 2),
        "bandwidth_bound_tokens_per_s": round(bound, 2),
        "fraction_of_bound": round(median["decode_tokens_per_s"] / batch_size / bound, 3),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        **({"speculative": speculative["speculative"], "acceptance_rate": round(median["acceptance_rate"], 3)}
           if speculative else {}),
    }


def context_sweep(model, plot: Path, new_tokens: int = 16, lengths=(128, 512, 1024, 2048)) -> list[dict]:
    """Decode tokens/s at several context lengths, drawn to `plot` (needs matplotlib, the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'gemma-deploy[plot]'") from None
    limit = model.context_length - new_tokens
    points = []
    for length in [n for n in lengths if n <= limit]:
        result = time_generation(model, prompt_ids(model, length, 1), new_tokens)
        points.append({"context": length, "decode_tokens_per_s": round(result["decode_tokens_per_s"], 2)})
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([p["context"] for p in points], [p["decode_tokens_per_s"] for p in points], marker="o")
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("decode tokens/s")
    axis.set_title(Path(model.manifest.folder).name)
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(plot)
    plt.close(figure)
    return points


def format_report(report: dict) -> str:
    return "\n".join(f"{key:>30}: {value}" for key, value in report.items() if key != "context_sweep")
