"""Where a prefill and a decode step spend their time, per operator kind, against the weight bytes each reads.

    python scripts/profile_ops.py DIR [--prompt-length 128] [--new-tokens 32] [--threads 2] [--json]

ONNX Runtime's profiler (SessionOptions.enable_profiling) on the artifact's own session, through the runtime:
one greedy generation to warm up, then one profiled; the prefill is that generation's first run, the decode
steps the runs after it (median step per operator kind). "weights MiB" is the bytes of the initializers the
operator kind's nodes read (each counted once per run), "GB/s" what that makes at the measured time. Run it on an
idle machine; ONNX Runtime adds a little time per node when profiling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from runtime.bench import time_generation


def profiled_model(folder: Path, threads: int | None):
    """The runtime's model with profiling switched on in its ONNX Runtime session."""
    import onnxruntime as ort

    import runtime

    make_options = ort.SessionOptions

    def profiling_options():
        options = make_options()
        options.enable_profiling = True
        return options

    ort.SessionOptions = profiling_options
    try:
        return runtime.load(folder, verify=False, threads=threads)
    finally:
        ort.SessionOptions = make_options


def weight_bytes_by_node(path: Path) -> dict[str, tuple[str, int]]:
    """node name -> (op type, bytes of its initializer inputs), from the graph as saved (before ORT's fusions)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sizes = {}
    for init in model.graph.initializer:
        count = int(np.prod(init.dims)) if init.dims else 1
        sizes[init.name] = count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return {n.name: (n.op_type, sum(sizes.get(i, 0) for i in n.input)) for n in model.graph.node}


def runs_of(trace: list[dict]) -> list[dict[str, list[tuple[str, float]]]]:
    """Per model run, the (op type, ms) of every node that ran in it, and the node names."""
    runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])
    nodes = sorted((e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    out, i = [], 0
    for run in runs:
        end = run["ts"] + run["dur"]
        ops: list[tuple[str, str, float]] = []
        while i < len(nodes) and nodes[i]["ts"] < end:
            e = nodes[i]
            if e["ts"] >= run["ts"]:
                ops.append((e["args"]["op_name"], e["name"].removesuffix("_kernel_time"), e["dur"] / 1000))
            i += 1
        out.append({"ms": run["dur"] / 1000, "ops": ops})
    return out


def table(runs: list[dict], weights: dict[str, tuple[str, int]]) -> dict:
    """Median over runs of each op kind's ms and calls per run; weight bytes by op kind."""
    per_kind = defaultdict(list)
    calls = defaultdict(list)
    read = defaultdict(int)
    for run in runs:
        ms, count = defaultdict(float), defaultdict(int)
        for kind, _, dur in run["ops"]:
            ms[kind] += dur
            count[kind] += 1
        for kind in ms:
            per_kind[kind].append(ms[kind])
            calls[kind].append(count[kind])
    for kind, name, _ in runs[0]["ops"]:
        read[kind] += weights.get(name, ("", 0))[1]
    rows = [{"op": kind, "ms": statistics.median(v), "calls": int(statistics.median(calls[kind])),
             "weights_mib": read[kind] / 2**20} for kind, v in per_kind.items()]
    rows.sort(key=lambda r: -r["ms"])
    return {"run_ms": statistics.median(r["ms"] for r in runs),
            "nodes_ms": sum(r["ms"] for r in rows), "rows": rows}


def print_table(title: str, t: dict) -> None:
    print(f"\n{title}: {t['run_ms']:.2f} ms a run, {t['nodes_ms']:.2f} ms in kernels "
          f"({t['run_ms'] - t['nodes_ms']:.2f} ms between them)")
    print(f"{'operator':32s} {'ms':>8s} {'share':>6s} {'calls':>6s} {'weights MiB':>12s} {'GB/s':>6s}")
    for r in t["rows"]:
        rate = f"{r['weights_mib'] * 2**20 / r['ms'] / 1e6:6.1f}" if r["weights_mib"] > 1 else ""
        print(f"{r['op']:32s} {r['ms']:8.3f} {r['ms'] / t['run_ms']:6.1%} {r['calls']:6d} "
              f"{r['weights_mib']:12.1f} {rate:>6s}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = profiled_model(args.artifact, args.threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 200_000, size=(1, args.prompt_length), dtype=np.int64)
    ids[:, 0] = 2  # <bos>
    for _ in range(2):  # the first generation warms up; both are in the trace, the second is read
        time_generation(model, ids, args.new_tokens)
    trace_file = Path(model.backend.session.end_profiling())
    try:
        runs = runs_of(json.loads(trace_file.read_text()))
    finally:
        trace_file.unlink()
    ours = runs[len(runs) // 2:]  # the second generation: a prefill, then new_tokens - 1 decode steps
    weights = weight_bytes_by_node(args.artifact / "model.onnx")
    result = {"prefill": table(ours[:1], weights), "decode": table(ours[1:], weights),
              "prompt_length": args.prompt_length}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print_table(f"prefill of {args.prompt_length} tokens", result["prefill"])
    print_table(f"decode step (median of {len(ours) - 1})", result["decode"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
