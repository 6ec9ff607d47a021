"""Long context: sliding-window layers on a window or a ring against full buffers, in one run: KV bytes and decode
tokens/s.

    python scripts/bench_long.py [--model gemma3-270m] [--contexts 2048,8192,32000] [--new-tokens 32] \\
        [--rounds 3] [--target ort] [--workdir /tmp/bench-long] [--plot long.png] [--json]

Exports the model with --kv-cache static --max-length (the longest context + --new-tokens) --logits last, once per
--sliding-cache: window (the kernel's windowed cache, --target ort's default), ring and full (--target onnx: ring and
full); kept in --workdir and reused. Prints:
- KV bytes of one row for an artifact whose --max-length is each context, per layout (the buffers the runtime
  allocates: manifest kv.slots);
- decode tokens/s after a cache of each context: --new-tokens decode steps of one row after its length is set to
  the context and its slots filled (what they hold does not change the work a step does, so no prefill is run;
  slots never written would, as they read from one page of zeros), rounds
  interleaved (window, ring, full, window...), median per artifact, and each layout's ratio to full;
- each artifact's parity (its manifest: verified against PyTorch at export).
With --genai DIR (an onnxruntime-genai folder: scripts/build_genai_baseline.py) its decode after a real prefill of
each context joins, where it runs that long. --plot draws decode tokens/s against context (needs matplotlib).
Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

def layouts(target: str) -> tuple[str, ...]:
    """The --sliding-cache layouts compared (the windowed cache is GroupQueryAttention's: --target ort only)."""
    return ("window", "ring", "full") if target == "ort" else ("ring", "full")


def export_all(model: str, target: str, max_length: int, workdir: Path) -> dict[str, Path]:
    from exporter import ExportOptions, export
    from runtime.manifest import read_manifest

    folders = {}
    for mode in layouts(target):
        folder = workdir / f"{mode}-{target}-{max_length}"
        try:
            manifest = read_manifest(folder, verify=False)
            reuse = manifest.kv.max_length == max_length and manifest.kv.sliding_cache == mode
        except Exception:  # absent or unreadable: export it
            reuse = False
        if not reuse:
            export(model, folder, ExportOptions(target=target, kv_cache="static", max_length=max_length, logits="last",
                                                sliding_cache=mode, overwrite=True))
        folders[mode] = folder
    return folders


def kv_bytes(manifest, context: int, target: str, modes) -> dict[str, int]:
    """One row's KV bytes for an artifact of --max-length `context`, per mode (the spec's slots)."""
    from runtime.spec import ArtifactOptions, resolve

    return {mode: resolve(ArtifactOptions(target=target, kv_cache="static", max_length=context,
                                          sliding_cache=mode), manifest.model).kv.bytes_per_row() for mode in modes}


def ours_decode(model, context: int, new_tokens: int):
    """One row decoding `new_tokens` steps after a cache of `context` tokens; tokens/s."""
    token = np.array([[1000]], np.int64)

    def once() -> float:
        cache = model.new_cache(1, context + new_tokens)
        cache.assume(0, context)
        model.backend.fill(0.01)  # slots never written would read faster than a computed context's
        start = time.perf_counter()
        for _ in range(new_tokens):
            cache.feed(slice(0, 1), token)
        return new_tokens / (time.perf_counter() - start)

    return once


def genai_decode(folder: Path, context: int, new_tokens: int):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    ids = np.random.default_rng(0).integers(1000, 200_000, size=(1, context), dtype=np.int32)

    def once() -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=context + new_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        generator.generate_next_token()
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            generator.generate_next_token()
        return (new_tokens - 1) / (time.perf_counter() - start)

    return once


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--contexts", default="2048,8192,32000", help="comma-separated context lengths")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target", default="ort", choices=["onnx", "ort"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-long"))
    parser.add_argument("--genai", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    import runtime

    contexts = [int(c) for c in args.contexts.split(",")]
    modes = layouts(args.target)
    folders = export_all(args.model, args.target, max(contexts) + args.new_tokens, args.workdir)
    models = {mode: runtime.load(folder, verify=False) for mode, folder in folders.items()}
    runners = {(mode, c): ours_decode(models[mode], c, args.new_tokens) for c in contexts for mode in modes}
    if args.genai:
        runners |= {("genai", c): genai_decode(args.genai, c, args.new_tokens) for c in contexts}
    samples = {key: [] for key in runners}
    for key, run in runners.items():  # warm-up, unmeasured
        try:
            run()
        except Exception as e:  # onnxruntime-genai at a context it does not take
            print(f"{key[0]} at {key[1]} tokens: {type(e).__name__}: {str(e).splitlines()[0][:160]}", file=sys.stderr)
            samples[key] = None
    for _ in range(args.rounds):
        for key, run in runners.items():
            if samples[key] is not None:
                samples[key].append(run())

    manifest = models["ring"].manifest
    rows = []
    for c in contexts:
        row = {"context": c, "kv_bytes": kv_bytes(manifest, c, args.target, modes)}
        row["decode_tokens_per_s"] = {mode: round(statistics.median(samples[(mode, c)]), 2)
                                      for mode in [*modes, "genai"] if samples.get((mode, c))}
        row["decode_ratio_to_full"] = {mode: round(row["decode_tokens_per_s"][mode] / row["decode_tokens_per_s"]["full"], 3)
                                       for mode in modes if mode != "full"}
        rows.append(row)
    parity = {mode: models[mode].manifest.parity.max_abs_diff for mode in modes}
    if args.json:
        print(json.dumps({"model": args.model, "target": args.target, "new_tokens": args.new_tokens,
                          "rounds": args.rounds, "ring_size": manifest.kv.ring_size, "parity_max_abs_diff": parity,
                          "rows": rows}, indent=2))
    else:
        kv = manifest.kv
        print(f"{args.model}, --target {args.target}: {len(kv.ring_layers)} of {kv.num_layers} layers sliding, "
              f"{kv.ring_size} slots; decode {args.new_tokens} steps, median of {args.rounds} interleaved rounds")
        header = [f"KV {m} MiB" for m in modes] + [f"{m} tok/s" for m in modes] + [f"{m}/full" for m in modes[:-1]]
        print(f"{'context':>8} " + " ".join(f"{h:>13}" for h in header) + (f" {'genai tok/s':>12}" if args.genai else ""))
        for r in rows:
            speed = r["decode_tokens_per_s"]
            cells = ([f"{r['kv_bytes'][m] / 2**20:13.1f}" for m in modes] + [f"{speed[m]:13.1f}" for m in modes]
                     + [f"{r['decode_ratio_to_full'][m]:13.2f}" for m in modes[:-1]])
            line = f"{r['context']:8d} " + " ".join(cells)
            if args.genai:
                line += f" {speed['genai']:12.1f}" if "genai" in speed else f" {'failed':>12}"
            print(line)
        print("parity at export (max |logit diff| against PyTorch): "
              + ", ".join(f"{m} {parity[m]:.2e}" for m in modes))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        for mode in [*modes, "genai"]:
            points = [(r["context"], r["decode_tokens_per_s"][mode]) for r in rows if mode in r["decode_tokens_per_s"]]
            if points:
                axis.plot(*zip(*points), marker="o", label=mode if mode != "genai" else "onnxruntime-genai")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel("decode tokens/s")
        axis.set_title(f"{args.model}: sliding-window layers' caches against full buffers")
        axis.legend()
        axis.grid(True, alpha=0.3)
        figure.tight_layout()
        figure.savefig(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
