"""`gemma-run bench`: what one artifact does on this machine, as figures.

Decode at short context is bound by reading the weights once per token: the report gives the weight
bytes read per token, a measured read bandwidth (a float32 matrix-vector product in numpy's BLAS, the
same kind of kernel), the bound they imply, and the fraction of it achieved.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import numpy as np

from .generate import generate_step
from .sampling import make_sampler

WEIGHT_FILES = ("model.onnx", "model.onnx.data")


def prompt_ids(model, length: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """Random ordinary tokens after <bos>: the content does not change the cost."""
    vocab = model.manifest["config"]["vocab_size"]
    rng = np.random.default_rng(seed)
    low = 1000 if vocab > 2000 else 3  # past the special tokens
    ids = rng.integers(low, min(vocab, 200_000), size=(batch_size, length), dtype=np.int64)
    ids[:, 0] = model.manifest.generation.get("bos_token_id", 2)
    return ids


def time_generation(model, ids: np.ndarray, new_tokens: int) -> dict:
    """One prefill + `new_tokens - 1` decode steps, greedy; wall times and time inside session.run."""
    backend = model.backend
    mask = np.ones_like(ids)
    sampler = make_sampler()
    start = time.perf_counter()
    stamps, runs = [], []
    for _ in generate_step(backend, ids, mask, sampler, new_tokens):
        stamps.append(time.perf_counter())
        runs.append(backend.run_seconds)
    prefill = stamps[0] - start
    decode_wall = stamps[-1] - stamps[0]
    decode_run = runs[-1] - runs[0]
    steps = len(stamps) - 1
    return {
        "prefill_ms": 1000 * prefill,
        "decode_tokens_per_s": ids.shape[0] * steps / decode_wall if steps else 0.0,
        "step_ms": 1000 * decode_wall / steps if steps else 0.0,
        "overhead_fraction": (decode_wall - decode_run) / decode_wall if steps else 0.0,
    }


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a float32 matrix-vector product over a matrix of this size (median of repeats)."""
    rows = megabytes * 2**20 // (4 * 4096)
    matrix = np.random.default_rng(0).random((rows, 4096), dtype=np.float32)
    vector = np.ones(4096, np.float32)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        matrix @ vector
        times.append(time.perf_counter() - start)
    return matrix.nbytes / statistics.median(times[1:])


def weight_bytes(model) -> int:
    files = model.manifest["files"]
    return sum(files[name]["size"] for name in WEIGHT_FILES if name in files)


def benchmark(model, prompt_length: int, new_tokens: int, batch_size: int = 1, runs: int = 5, warmup: int = 1) -> dict:
    ids = prompt_ids(model, prompt_length, batch_size)
    for _ in range(warmup):
        time_generation(model, ids, new_tokens)
    samples = [time_generation(model, ids, new_tokens) for _ in range(runs)]
    median = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    bandwidth = read_bandwidth()
    weights = weight_bytes(model)
    bound = bandwidth / weights
    return {
        "artifact": str(model.manifest.folder),
        "dtype": model.manifest["dtype"],
        "kv_layout": model.backend.kv_layout,
        "provider": model.backend.provider,
        "prompt_length": prompt_length,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "runs": runs,
        "prefill_ms": round(median["prefill_ms"], 2),
        "decode_tokens_per_s": round(median["decode_tokens_per_s"], 2),
        "decode_step_ms": round(median["step_ms"], 3),
        "overhead_percent": round(100 * median["overhead_fraction"], 2),
        "weight_bytes_per_token": weights,
        "read_bandwidth_gb_per_s": round(bandwidth / 1e9, 2),
        "bandwidth_bound_tokens_per_s": round(bound, 2),
        "fraction_of_bound": round(median["decode_tokens_per_s"] / batch_size / bound, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def context_sweep(model, plot: Path, new_tokens: int = 16, lengths=(128, 512, 1024, 2048)) -> list[dict]:
    """Decode tokens/s at several context lengths, drawn to `plot` (matplotlib, optional extra)."""
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
    return points


def format_report(report: dict) -> str:
    return "\n".join(f"{key:>30}: {value}" for key, value in report.items() if key != "context_sweep")
