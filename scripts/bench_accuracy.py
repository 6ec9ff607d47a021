"""Accuracy of exported precisions against float32, teacher-forced over a held-out text.

    python scripts/bench_accuracy.py --reference artifacts/fp32 artifacts/fp16 artifacts/int4 \\
        [--genai ~/.cache/gemma-deploy/gemma3-270m/genai-int4] [--text tests/data/heldout.txt] [--json] \\
        [--llama-cpp ~/.cache/gemma-deploy/gemma3-270m/gemma-3-270m-q4_k_m.gguf]

Every graph is run on ONNX Runtime's CPU provider over the same token ids (the reference artifact's
tokenizer, <bos> first), in chunks of --chunk tokens with its KV cache, all positions' logits. Printed per
graph: perplexity, its ratio to the reference's, top-1 agreement with the reference, the max and mean |logit
difference| from it (the mean moves smoothly with precision; top-1 is decided at near-tied positions), and
the count of non-finite logits. bfloat16 graphs run through exporter's bfloat16
emulation (ONNX Runtime's CPU provider has no bfloat16 kernels). `--genai DIR` adds an onnxruntime-genai
model folder (run through its generator, which returns every appended position's logits). Artifacts must be exported with the dynamic KV layout
and `--logits all`.

`--llama-cpp GGUF` runs llama.cpp's llama-perplexity on the same text and adds, for every graph, the perplexity
by its rules ("ppl, llama.cpp's way"): the tokens cut into windows of --window (512), each run alone with <bos>
first, only the second half of each window scored. llama.cpp tokenizes the text itself; the script checks that it
finds as many windows as we do.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT / "tests" / "data" / "heldout.txt"


def token_ids(reference: Path, text: str) -> np.ndarray:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(reference / "tokenizer.json")).encode(text).ids
    return np.array([ids], dtype=np.int64)  # the post-processor adds <bos>


def graph_path(folder: Path, scratch: Path) -> tuple[Path, str, int]:
    """The ONNX file to run, a label and the head size; bfloat16 artifacts go through the emulation."""
    if (folder / "manifest.json").is_file():
        from runtime import read_manifest

        manifest = read_manifest(folder, verify=False)
        if manifest.kv.layout != "dynamic" or manifest.graph.logits != "all":
            raise SystemExit(f"{folder}: needs the dynamic KV layout and --logits all")
        head_dim = manifest.kv.head_dim
        if manifest.precision.dtype == "bf16":
            from exporter.bf16_emulation import emulate_bfloat16

            path = emulate_bfloat16(folder / "model.onnx", scratch / folder.name / "model.onnx")
            return path, folder.name, head_dim
        return folder / "model.onnx", folder.name, head_dim
    genai = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    return folder / genai["filename"], f"onnxruntime-genai:{folder.name}", genai["head_size"]


def teacher_forced(path: Path, ids: np.ndarray, chunk: int, threads: int | None, head_dim: int):
    """Logits [T, V] (float32) of every position, chunk by chunk through the graph's KV cache."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    past = {name: np.zeros((1, i.shape[1], 0, head_dim), dtypes[i.type])
            for name, i in inputs.items() if name.startswith("past_key_values")}
    outputs = [o.name for o in session.get_outputs()]
    logits, seconds = [], 0.0
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        feeds = {"input_ids": ids[:, start:end], "attention_mask": np.ones((1, end), np.int64), **past}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(start, end, dtype=np.int64)[None]
        t = time.perf_counter()
        results = dict(zip(outputs, session.run(None, feeds)))
        seconds += time.perf_counter() - t
        logits.append(results["logits"][0].astype(np.float32))
        past = {name: results[name.replace("past_key_values", "present")] for name in past}
    return np.concatenate(logits), seconds


def teacher_forced_genai(folder: Path, ids: np.ndarray, chunk: int):
    """The same through onnxruntime-genai's generator (its graph keeps a sliding-window KV buffer of its own)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + 1)
    generator = og.Generator(model, params)
    logits, seconds = [], 0.0
    for start in range(0, ids.shape[1], chunk):
        t = time.perf_counter()
        generator.append_tokens(ids[:, start : start + chunk].astype(np.int32))
        logits.append(np.array(generator.get_output("logits"))[0].astype(np.float32))
        seconds += time.perf_counter() - t
    return np.concatenate(logits), seconds


def metrics(logits: np.ndarray, ids: np.ndarray) -> tuple[float, np.ndarray]:
    """Perplexity of the text's next tokens, and the top-1 token per position."""
    shifted = logits[:-1].astype(np.float64)
    shifted -= shifted.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(len(shifted)), ids[0, 1:]]
    return float(np.exp(nll.mean())), logits.argmax(-1)


def logit_difference(logits: np.ndarray, reference: np.ndarray, rows: int = 128) -> tuple[float, float]:
    """Max and mean |logits - reference|, a block of positions at a time (a whole [2k, 262k] difference
    would be another 2 GB)."""
    largest, total = 0.0, 0.0
    for start in range(0, len(logits), rows):
        diff = np.abs(logits[start:start + rows] - reference[start:start + rows])
        largest, total = max(largest, float(diff.max())), total + float(diff.sum(dtype=np.float64))
    return largest, total / logits.size


LLAMA_PERPLEXITY = Path.home() / ".cache" / "gemma-deploy" / "llama.cpp" / "bin" / "llama-perplexity"


def windowed_perplexity(run_window, ids: np.ndarray, window: int, bos: int) -> float:
    """llama-perplexity's rule: windows of `window` tokens, <bos> first, each run alone; the second half scored."""
    nll = []
    for start in range(0, ids.shape[1] - window + 1, window):
        chunk = ids[:, start:start + window].copy()
        chunk[0, 0] = bos
        logits = run_window(chunk).astype(np.float64)
        first = window // 2
        shifted = logits[first:window - 1]
        log_probs = shifted - shifted.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        nll.extend(-log_probs[np.arange(len(shifted)), chunk[0, first + 1:window]])
    return float(np.exp(np.mean(nll)))


def llama_perplexity(binary: Path, gguf: Path, text: Path, window: int, threads: int | None) -> tuple[float, int]:
    """(llama.cpp's perplexity over `text`, its number of windows)."""
    if not binary.is_file():
        raise SystemExit(f"{binary} does not exist: build it with bash scripts/build_llama_cpp.sh, "
                         "or pass --llama-perplexity PATH")
    command = [str(binary), "-m", str(gguf), "-f", str(text), "-c", str(window), "-t", str(threads or 2)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stderr + done.stdout)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", done.stderr + done.stdout)
    if done.returncode or not found or not chunks:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return float(found.group(1)), int(chunks.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="The float32 artifact.")
    parser.add_argument("artifacts", type=Path, nargs="*")
    parser.add_argument("--genai", type=Path, action="append", default=[], help="An onnxruntime-genai model folder.")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--llama-cpp", type=Path, default=None, metavar="GGUF")
    parser.add_argument("--llama-perplexity", type=Path, default=LLAMA_PERPLEXITY)
    parser.add_argument("--window", type=int, default=512, help="llama-perplexity's context (-c)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    ids = token_ids(args.reference, args.text.read_text())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as scratch:
        reference_logits = reference_ppl = reference_top = None
        for folder in [args.reference, *args.artifacts, *args.genai]:
            path, label, head_dim = graph_path(folder, Path(scratch))
            if label.startswith("onnxruntime-genai"):
                logits, seconds = teacher_forced_genai(folder, ids, args.chunk)
            else:
                logits, seconds = teacher_forced(path, ids, args.chunk, args.threads, head_dim)
            finite = np.isfinite(logits)
            ppl, top = metrics(np.where(finite, logits, 0), ids)
            windowed = None
            if args.llama_cpp is not None:
                run = ((lambda w: teacher_forced_genai(folder, w, args.window)[0]) if label.startswith("onnxruntime-genai")
                       else (lambda w: teacher_forced(path, w, args.window, args.threads, head_dim)[0]))
                windowed = round(windowed_perplexity(run, ids, args.window, int(ids[0, 0])), 4)
            if reference_logits is None:
                reference_logits, reference_ppl, reference_top = logits, ppl, top
            max_diff, mean_diff = logit_difference(logits, reference_logits)
            rows.append({
                "graph": label,
                "perplexity": round(ppl, 4),
                "ppl_ratio": round(ppl / reference_ppl, 4),
                "top1_agreement": round(float((top == reference_top).mean()), 4),
                "max_abs_logit_diff": round(max_diff, 4),
                "mean_abs_logit_diff": round(mean_diff, 5),
                "non_finite": int((~finite).sum()),
                "size_mib": round(sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".data")) / 2**20, 1),
                "seconds": round(seconds, 1),
                "perplexity_llama_cpp_rules": windowed,
            })
            del logits
    if args.llama_cpp is not None:
        ppl, windows = llama_perplexity(args.llama_perplexity, args.llama_cpp, args.text, args.window, args.threads)
        if windows != ids.shape[1] // args.window:
            raise SystemExit(f"llama.cpp cut the text into {windows} windows, we into {ids.shape[1] // args.window}: "
                             "the tokenizations differ too much to compare")
        rows.append({"graph": f"llama.cpp:{args.llama_cpp.name}", "perplexity_llama_cpp_rules": ppl,
                     "size_mib": round(args.llama_cpp.stat().st_size / 2**20, 1)})
    if args.json:
        print(json.dumps({"tokens": int(ids.shape[1]), "text": str(args.text), "rows": rows}, indent=2))
        return 0
    print(f"{ids.shape[1]} tokens of {args.text.name}, teacher-forced; reference {args.reference}")
    windowed = args.llama_cpp is not None
    print(f"{'graph':36s} {'ppl':>8s} {'ratio':>7s} {'top-1':>7s} {'max|dlogit|':>11s} {'mean|dlogit|':>12s} "
          f"{'non-finite':>10s} {'MiB':>7s}" + (f" {'ppl, llama.cpp rules':>21s}" if windowed else ""))
    for r in rows:
        if "perplexity" in r:
            line = (f"{r['graph']:36s} {r['perplexity']:8.3f} {r['ppl_ratio']:7.3f} {r['top1_agreement']:7.2%} "
                    f"{r['max_abs_logit_diff']:11.3f} {r['mean_abs_logit_diff']:12.4f} {r['non_finite']:10d} "
                    f"{r['size_mib']:7.1f}")
        else:  # llama.cpp's row: its own perplexity only
            line = f"{r['graph']:36s} {'':8s} {'':7s} {'':7s} {'':11s} {'':12s} {'':10s} {r['size_mib']:7.1f}"
        print(line + (f" {r['perplexity_llama_cpp_rules']:21.3f}" if windowed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
