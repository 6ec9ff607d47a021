"""The tied lm_head (262k x 640 on the packaged model) in each form ONNX Runtime can run it, alone: ms per call at
one row (a decode step), the bytes it reads and the rate, and its accuracy on real final hidden states.

    python scripts/bench_lm_head.py [--positions 2000] [--threads 2] [--runs 15]

The hidden states are the packaged model's final (normed) states over tests/data/heldout.txt, computed by
transformers; the reference is their float32 product with the table. Each form is its own one-node session
(two for MatMulInteger), thread spinning off so that the sessions taking turns do not steal each other's cores;
the calls go round-robin, median of --runs. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def hidden_states(positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(final hidden states [P, H], the tied table [V, H]) of the packaged model over the held-out text."""
    import torch
    import transformers

    from models import packaged

    folder = packaged.prepare()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer((ROOT / "tests" / "data" / "heldout.txt").read_text(), return_tensors="pt").input_ids[:, :positions]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]
    return hidden.numpy(), model.model.embed_tokens.weight.detach().numpy()


def forms(W: np.ndarray) -> dict:
    """name -> (nodes, initializers) computing y = x @ W for x [M, K], W [K, N]."""
    from onnx import TensorProto, helper, numpy_helper

    from exporter.blocks import ggml_blocks, rtn

    K, N = W.shape
    result = {"float32 MatMul": ([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(W, "w")])}

    def nbits(blocks):
        inits = [numpy_helper.from_array(blocks.packed, "q"), numpy_helper.from_array(blocks.scales.reshape(-1), "s")]
        inputs = ["x", "q", "s"]
        if blocks.zero_points is not None:
            inits.append(numpy_helper.from_array(blocks.zero_points.reshape(-1), "z"))
            inputs.append("z")
        node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=K, N=N, bits=blocks.bits,
                                block_size=blocks.block_size, accuracy_level=4)
        return [node], inits

    result["MatMulNBits 8-bit, Q8_0 blocks of 32 (ours)"] = nbits(ggml_blocks(W, "Q8_0"))
    result["MatMulNBits 8-bit, blocks of 128, zero points"] = nbits(rtn(W, 8, 128, False))
    for block in (32, 64, 128):
        result[f"MatMulNBits 4-bit, blocks of {block}, zero points"] = nbits(rtn(W, 4, block, False))
    scale = (np.abs(W).max(0) / 127.0).astype(np.float32)  # per column (one per vocabulary row)
    q = np.clip(np.rint(W / scale), -127, 127).astype(np.int8)
    weights = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s")]
    result["DynamicQuantizeMatMul, int8 per column"] = (
        [helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s"], ["y"], domain="com.microsoft")], weights)
    result["MatMulInteger u8s8, int8 per column"] = ([
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "q", "xz"], ["yi"]),
        helper.make_node("Cast", ["yi"], ["yf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "s"], ["ss"]),
        helper.make_node("Mul", ["yf", "ss"], ["y"]),
    ], weights)
    return result


def session(nodes, initializers, K: int, N: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "lm_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    hidden, table = hidden_states(args.positions)
    W = np.ascontiguousarray(table.T)  # [K, N], as the graph holds it
    K, N = W.shape
    sessions = {}
    for name, (nodes, inits) in forms(W).items():
        sessions[name] = (session(nodes, inits, K, N, args.threads), sum(i.ByteSize() for i in inits))
    one = hidden[:1]
    for s, _ in sessions.values():
        s.run(None, {"x": one})
    times = {name: [] for name in sessions}
    for _ in range(args.runs):
        for name, (s, _) in sessions.items():
            start = time.perf_counter()
            s.run(None, {"x": one})
            times[name].append(time.perf_counter() - start)

    print(f"lm_head [{K}, {N}], one row, {args.threads} threads, median of {args.runs}; accuracy over {len(hidden)} "
          "real final hidden states against the float32 product")
    print(f"{'form':48s} {'ms':>6s} {'MiB':>6s} {'GB/s':>6s} {'top-1':>8s} {'mean|d|':>8s} {'max|d|':>7s}")
    for name, (s, nbytes) in sessions.items():
        agree, total, largest = 0, 0.0, 0.0
        for start in range(0, len(hidden), 128):  # [128, 262k] at a time: the whole product is 2 GB
            rows = hidden[start:start + 128]
            reference = rows @ W
            y = s.run(None, {"x": rows})[0]
            d = np.abs(y - reference)
            agree += int((y.argmax(1) == reference.argmax(1)).sum())
            total, largest = total + float(d.sum()), max(largest, float(d.max()))
        ms = 1000 * statistics.median(times[name])
        print(f"{name:48s} {ms:6.2f} {nbytes / 2**20:6.0f} {nbytes / ms / 1e6:6.1f} {agree / len(hidden):8.2%} "
              f"{total / (len(hidden) * N):8.4f} {largest:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
