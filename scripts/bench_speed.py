"""Our artifacts against onnxruntime-genai and llama.cpp on the same CPU, in one run: prefill ms, decode tokens/s.

    python scripts/bench_speed.py artifacts/int4 artifacts/fp32 --genai ~/.cache/gemma-deploy/gemma3-270m/genai-int4 \\
        --llama-cpp ~/.cache/gemma-deploy/gemma3-270m/gemma-3-270m-q4_k_m.gguf \\
        [--prompt-length 128] [--new-tokens 64] [--batch-size 1] [--threads 2] [--runs 5] [--json]

Greedy, the same random prompt ids for everyone (--batch-size rows of them: decode tokens/s counts every row's;
the static KV layout prefills its rows one after the other, so prefill ms is their sum); every graph is loaded first and warmed up once,
then the runs go round-robin (one of each in turn), median of --runs per graph. Ours run
through the runtime (runtime.bench.time_generation); onnxruntime-genai through its generator: prefill is
the time of append_tokens(prompt) plus the first token, decode the time per following token. llama.cpp through
its llama-bench (scripts/build_llama_cpp.sh builds it; --llama-bench to point elsewhere) on a GGUF, one
repetition a round: prefill is its pp test of --prompt-length tokens, decode its tg test of --new-tokens after a
context of --prompt-length (-d), so both sides decode after the same prompt. Ratios are against the first --genai
model, else the GGUF, else the first artifact. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def genai_generation(folder: Path, ids: np.ndarray, new_tokens: int) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def once() -> dict:
        params = og.GeneratorParams(model)
        # Its GroupQueryAttention wants a KV buffer at least as long as the sliding window (512 on Gemma 3).
        params.set_search_options(do_sample=False, max_length=max(ids.shape[1] + new_tokens, 1024))
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids.astype(np.int32))  # the prompt's forward (prefill)
        generator.generate_next_token()  # the first new token comes from the prefill's logits
        first = time.perf_counter()
        steps = 0
        while not generator.is_done() and steps < new_tokens - 1:
            generator.generate_next_token()
            steps += 1
        end = time.perf_counter()
        return {"prefill_ms": 1000 * (first - start), "decode_tokens_per_s": steps / (end - first)}

    return once


def ours_generation(folder: Path, ids: np.ndarray, new_tokens: int, threads: int):
    import runtime
    from runtime.bench import time_generation

    model = runtime.load(folder, verify=False, threads=threads)
    return lambda: time_generation(model, ids, new_tokens)


LLAMA_BENCH = Path.home() / ".cache" / "gemma-deploy" / "llama.cpp" / "bin" / "llama-bench"


def llama_cpp_generation(binary: Path, gguf: Path, prompt_length: int, new_tokens: int, threads: int):
    if not binary.is_file():
        raise SystemExit(f"{binary} does not exist: build it with bash scripts/build_llama_cpp.sh "
                         "(about 20 minutes), or pass --llama-bench PATH")

    def test(*args: str) -> dict:
        command = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json", *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        return json.loads(done.stdout)[0]

    def once() -> dict:
        prefill = test("-p", str(prompt_length), "-n", "0")
        decode = test("-p", "0", "-n", str(new_tokens), "-d", str(prompt_length))
        return {"prefill_ms": prefill["avg_ns"] / 1e6, "decode_tokens_per_s": decode["avg_ts"]}

    return once


def interleaved_medians(runners: dict, runs: int) -> dict:
    """Each runner warmed up once, then `runs` rounds of one run of each in turn: the machine's drift over
    minutes falls on every graph alike instead of on whichever ran last. Median per graph."""
    for run in runners.values():
        run()
    samples = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            samples[name].append(run())
    return {name: {key: round(statistics.median(s[key] for s in rows), 2) for key in ("prefill_ms", "decode_tokens_per_s")}
            for name, rows in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path, nargs="*")
    parser.add_argument("--genai", type=Path, action="append", default=[])
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--llama-cpp", type=Path, action="append", default=[], metavar="GGUF")
    parser.add_argument("--llama-bench", type=Path, default=LLAMA_BENCH)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=1, help="rows decoded together (our artifacts only)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 200_000, size=(args.batch_size, args.prompt_length), dtype=np.int64)
    ids[:, 0] = 2  # <bos>
    if (args.genai or args.llama_cpp) and args.batch_size != 1:
        raise SystemExit("--genai and --llama-cpp run batch 1 only")
    runners = {f"onnxruntime-genai:{folder.name}": genai_generation(folder, ids, args.new_tokens) for folder in args.genai}
    runners |= {f"llama.cpp:{gguf.name}": llama_cpp_generation(args.llama_bench, gguf, args.prompt_length,
                                                               args.new_tokens, args.threads)
                for gguf in args.llama_cpp}
    runners |= {folder.name: ours_generation(folder, ids, args.new_tokens, args.threads) for folder in args.artifacts}
    rows = [{"graph": name, **medians} for name, medians in interleaved_medians(runners, args.runs).items()]
    base = rows[0]
    for row in rows:
        row["decode_ratio"] = round(row["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
        row["prefill_ratio"] = round(base["prefill_ms"] / row["prefill_ms"], 3)  # > 1: faster than the base
    if args.json:
        print(json.dumps({"prompt_length": args.prompt_length, "new_tokens": args.new_tokens,
                          "batch_size": args.batch_size, "rows": rows}, indent=2))
        return 0
    print(f"prompt {args.prompt_length} tokens, {args.new_tokens} new, batch {args.batch_size}, median of {args.runs}; "
          f"ratios against {base['graph']}")
    print(f"{'graph':36s} {'prefill ms':>10s} {'x':>6s} {'decode tok/s':>12s} {'x':>6s}")
    for r in rows:
        print(f"{r['graph']:36s} {r['prefill_ms']:10.1f} {r['prefill_ratio']:6.2f} {r['decode_tokens_per_s']:12.1f} "
              f"{r['decode_ratio']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
