"""The runtime against transformers' generate (PyTorch eager, same threads) on the real Gemma 3 270M,
float32, greedy, batch 1: prefill ms and decode tokens/s in one run, with their ratios.
Usage: python scripts/bench_decode.py [--artifact DIR] [--prompt-length 128] [--new-tokens 64] [--runs 5]"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def transformers_figures(folder: Path, ids, new_tokens: int, runs: int, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = torch.from_numpy(ids)
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)

    def timed(n):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(inputs, **{**kwargs, "min_new_tokens": n, "max_new_tokens": n})
        return time.perf_counter() - start

    timed(new_tokens)  # warm-up
    prefill = statistics.median(timed(1) for _ in range(runs))
    total = statistics.median(timed(new_tokens) for _ in range(runs))
    return {"prefill_ms": round(1000 * prefill, 2), "decode_tokens_per_s": round((new_tokens - 1) / (total - prefill), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifact", type=Path, default=Path("artifacts/gemma3-270m"))
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import runtime
    from models import packaged
    from runtime.bench import benchmark, prompt_ids

    if not (args.artifact / "manifest.json").is_file():
        from exporter import ExportOptions, export

        export("gemma3-270m", args.artifact, ExportOptions(logits="last"))
    model = runtime.load(args.artifact, threads=args.threads)
    ours = benchmark(model, args.prompt_length, args.new_tokens, 1, args.runs, warmup=1)
    ids = prompt_ids(model, args.prompt_length, 1)
    del model
    theirs = transformers_figures(packaged.prepare(), ids, args.new_tokens, args.runs, args.threads)
    print(json.dumps({
        "runtime": ours,
        "transformers": theirs,
        "decode_speedup": round(ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"], 2),
        "prefill_speedup": round(theirs["prefill_ms"] / ours["prefill_ms"], 2),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
