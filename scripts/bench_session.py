"""ONNX Runtime's session settings on one artifact, wall-clock: load time, and decode tokens/s in one interleaved run.

    python scripts/bench_session.py DIR [--prompt-length 128] [--new-tokens 64] [--rounds 5] [--json]

Each setting is a session of its own on the same artifact (ONNX Runtime's profiler inflates per-node time, so
nothing here profiles):
- `default`: what `runtime.load` opens (every core an intra-op thread, spinning, ORT_ENABLE_ALL);
- `threads=1`: one intra-op thread; `no-spin`: the threads sleep between runs (LoadOptions.spin);
- `basic`, `extended`: graph optimization levels below ORT_ENABLE_ALL;
- `saved`: a graph ONNX Runtime optimized and saved (SessionOptions.optimized_model_filepath), loaded with
  optimization off: what a load would cost if the export shipped the optimized graph.
Decode: greedy, one row, after a random prompt; the settings take turns, median per setting, ratio to `default`.
Load: median seconds to open an ONNX Runtime session at each level (all: the runtime's), taken in turns. Run it
on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETTINGS = ("default", "threads=1", "no-spin", "basic", "extended", "saved")


def load(folder: Path, setting: str, saved: Path):
    """The runtime's model on a session opened with `setting` (built here, then put in the backend before any run:
    the runtime itself opens every session at ORT_ENABLE_ALL)."""
    import runtime

    model = runtime.load(folder, verify=False, threads=1 if setting == "threads=1" else None,
                         spin=setting != "no-spin")
    if setting in ("default", "threads=1", "no-spin"):
        return model
    session = open_session(folder, setting, saved)
    model.backend.session, model.backend._binding = session, session.io_binding()
    return model


LEVELS = ("all", "basic", "extended", "saved")


def open_session(folder: Path, level: str, saved: Path):
    """An ONNX Runtime session on the artifact's graph at an optimization level (saved: the optimized graph, with
    optimization off)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "saved": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    graph = saved if level == "saved" else folder / "model.onnx"
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def open_seconds(folder: Path, level: str, saved: Path) -> float:
    start = time.perf_counter()
    open_session(folder, level, saved)
    return time.perf_counter() - start


def save_optimized(folder: Path, scratch: Path) -> Path:
    """The artifact's graph as ONNX Runtime optimizes it (ORT_ENABLE_ALL), saved beside a copy of nothing else."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(scratch / "optimized.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return scratch / "optimized.onnx"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from runtime.bench import time_generation

    ids = np.random.default_rng(0).integers(1000, 200_000, size=(1, args.prompt_length), dtype=np.int64)
    ids[:, 0] = 2
    with tempfile.TemporaryDirectory(prefix="gemma-session-") as scratch:
        saved = save_optimized(args.artifact, Path(scratch))
        loads = {s: [] for s in LEVELS}
        for _ in range(3):
            for level in LEVELS:
                loads[level].append(open_seconds(args.artifact, level, saved))
        models = {setting: load(args.artifact, setting, saved) for setting in SETTINGS}
        decode = {s: [] for s in SETTINGS}
        for setting, model in models.items():  # warm-up
            time_generation(model, ids, 8)
        for _ in range(args.rounds):
            for setting, model in models.items():
                decode[setting].append(time_generation(model, ids, args.new_tokens)["decode_tokens_per_s"])

    base = statistics.median(decode["default"])
    rows = [{"setting": s, "decode_tokens_per_s": round(statistics.median(decode[s]), 2),
             "decode_ratio": round(statistics.median(decode[s]) / base, 3)} for s in SETTINGS]
    load_s = {level: round(statistics.median(v), 3) for level, v in loads.items()}
    if args.json:
        print(json.dumps({"artifact": str(args.artifact), "rounds": args.rounds, "rows": rows, "load_s": load_s},
                         indent=2))
    else:
        print(f"{args.artifact}: prompt {args.prompt_length}, {args.new_tokens} new, median of {args.rounds} "
              "interleaved rounds")
        print(f"{'setting':12s} {'decode tok/s':>13s} {'x':>6s}")
        for r in rows:
            print(f"{r['setting']:12s} {r['decode_tokens_per_s']:13.1f} {r['decode_ratio']:6.2f}")
        print("session load, median of 3 (s): " + ", ".join(f"{k} {v:.2f}" for k, v in load_s.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
