"""Weight-only block quantization of the traced graph (`--quant int4`): a pass over the graph with a predicate.

Every MatMul on a constant [K, N] weight that the predicate selects becomes, per the spec's `format`:

    matmulnbits (ONNX Runtime):  MatMulNBits(x, packed [N, K/bs, bs*bits/8], scales, zero_points)
    qdq (TensorRT):              MatMul(x, DequantizeLinear(int4 [K, N], scales [K/bs, N], axis=0, block_size=bs))

The blocks themselves (round-to-nearest, HQQ, GPTQ's) are exporter/blocks.py. We drive the quantizers ourselves
because Gemma ties lm_head to the embedding: one [hidden, vocab] tensor feeds both the logits MatMul and the
lookup Gather. As onnxruntime-genai does, it is quantized once, for MatMulNBits, and the lookup becomes
GatherBlockQuantized on the same bytes (a Reshape of the packed tensor): one copy on disk and in memory.

`quantize_graph` also returns the dequantized value of every weight it replaced, so that verification can
compare the graph with a PyTorch reference holding exactly those weights (a fake-quantized model, built by
exporter/source.py): quantization error and graph error are then measured apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from runtime.manifest import QuantResult
from runtime.spec import QuantSpec

from .blocks import GGML_BLOCK, GGML_EXACT, Blocks, ggml_blocks, grid_blocks, hqq, int8_blocks, rtn
from .graph_io import save_in_place

log = logging.getLogger(__name__)

# which weights to quantize, and to how many bits: select(initializer name, is the tied embedding) -> 4, 8 or None
Select = Callable[[str, bool], "int | None"]


def weight_bits(quant: QuantSpec) -> Select:
    """The spec's predicate: every MatMul weight to 4 bits, those named in --int8-weights to 8, the tied
    lm_head/embedding to --lm-head's bits (None: left in float)."""
    lm_head = {"int4": 4, "int8": 8}.get(quant.lm_head)

    def select(name: str, tied: bool) -> int | None:
        if tied:
            return lm_head
        return 8 if any(part in name for part in quant.int8_weights) else 4

    return select


def quantize_graph(path: Path, quant: QuantSpec, progress: bool = True, precomputed: dict[str, Blocks] | None = None,
                   select: Select | None = None, ggml_types: dict[str, str] | None = None,
                   ) -> tuple[QuantResult, dict[str, np.ndarray]]:
    """Quantize the weights `select` picks (by default the spec's `weight_bits`) in the graph at `path`, in place;
    returns (what was done, {initializer name: dequantized [K, N]}).

    `precomputed` holds weights already quantized by name (GPTQ's, computed on the PyTorch model); `ggml_types`
    (method gguf) each Hugging Face weight's type in the GGUF the weights were dequantized from."""
    precomputed = precomputed or {}
    select = select or weight_bits(quant)
    import onnx_ir as ir

    model = ir.load(path)
    graph = model.graph
    operands = [(node, _weight_of(node)) for node in graph if node.op_type == "MatMul"]
    weights = [(node, value) for node, value in operands if value is not None]
    tied = _tied_embedding(graph)
    rewrite = _QDQ(graph, quant) if quant.format == "qdq" else _MatMulNBits(graph, quant)
    dequantized: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    counts = {"int4": 0, "int8": 0}
    from tqdm import tqdm

    for gather, value in _lookup_tables(graph):  # Gemma 4's per-layer embeddings: quantized like the tied table
        bits = select(value.name, True)
        if bits is None or quant.method == "gguf":
            skipped.append(value.name)
            continue
        table = value.const_value.numpy()  # [vocab, columns]
        blocks = _table_blocks(table, bits, quant)
        dequantized[value.name] = blocks.dequantize()
        rewrite.table(gather, blocks, value.name, table.dtype)
        counts[f"int{bits}"] += 1
        graph.initializers.pop(value.name)
    for node, value in tqdm(weights, desc="quantize", unit="weight", disable=not progress, leave=False):
        is_tied = tied is not None and value is tied[0]
        weight = value.const_value.numpy()
        blocks = _blocks(value.name, is_tied, weight, quant, select, precomputed, ggml_types)
        if blocks is None:
            skipped.append(value.name)
            continue
        bits = blocks.bits
        dequantized[value.name] = blocks.dequantize()
        rewrite.matmul(node, blocks, value)
        if is_tied:
            rewrite.lookup(tied[1], blocks, value.name, weight.dtype)
        counts[f"int{bits}"] += 1
        if not value.uses():
            graph.initializers.pop(value.name)
    if precomputed:  # GPTQ changed weights in PyTorch that the graph does not quantize: its float ones are those
        raise RuntimeError(f"GPTQ quantized weights the graph has no quantizable MatMul for: {sorted(precomputed)}")
    if tied is not None and quant.lm_head == "float":
        log.info("lm_head and the embedding stay in %s (--lm-head float)", tied[0].dtype)
    save_in_place(model, path)
    if counts["int8"] and quant.format == "matmulnbits" and quant.accuracy_level != 4:
        log.warning("--accuracy-level %d with int8 weights: ONNX Runtime's 8-bit MatMulNBits computes float32 "
                    "activations on a slow path, about 100x slower on x86 (docs/precision.md); keep level 4 or "
                    "pass --lm-head int4|float", quant.accuracy_level)
    summary = QuantResult(weights=counts, skipped=tuple(skipped))
    recipe = ("the GGUF's blocks" if quant.method == "gguf" else
              f"{quant.method}, block {quant.block_size}, {'symmetric' if quant.symmetric else 'zero points'}")
    log.info("quantized %d weights to int4 and %d to int8 (%s)", counts["int4"], counts["int8"], recipe)
    return summary, dequantized


# The tied table's 8-bit blocks (lm_head int8): Q8_0's rule on 128 values, not 32. Decode reads the 262k-row table
# every step; blocks of 128 read 166 MiB, not 180, and MatMulNBits runs them faster (docs/precision.md); the table
# stays within +0.1% perplexity of the GGUF's Q8_0 one.
TABLE_BLOCK = 128


def _blocks(name: str, tied: bool, weight: np.ndarray, quant: QuantSpec, select: Select,
            precomputed: dict[str, Blocks], ggml_types: dict[str, str] | None) -> Blocks | None:
    """One weight's blocks, or None to leave it in float. A layer's int8 is ggml's Q8_0 (blocks of 32, a scale each),
    the tied table's Q8_0's rule on blocks of TABLE_BLOCK."""
    if quant.method == "gguf" and not (tied and quant.lm_head != "gguf"):
        return _carried(weight, _ggml_type(ggml_types, name, tied), lookup=tied)
    bits = select(name, tied)
    if bits is None:
        return None
    if name in precomputed and bits == 4:
        return precomputed.pop(name)
    return _rounded(weight, bits, quant, tied)


def _rounded(weight: np.ndarray, bits: int, quant: QuantSpec, lookup: bool) -> Blocks:
    """Blocks of a weight without calibration: Q8_0's rule for 8 bits (on TABLE_BLOCK values for a table), else HQQ
    or round-to-nearest (a table that is also looked up always round-to-nearest: GatherBlockQuantized takes integer
    zero points only)."""
    if bits == 8 and quant.format == "matmulnbits":
        return ggml_blocks(weight, "Q8_0", _table_block(weight.shape[0]) if lookup else GGML_BLOCK)
    if quant.method == "hqq" and not lookup:
        return hqq(weight, quant.block_size)
    return rtn(weight, bits, quant.block_size, quant.symmetric)


def _table_block(columns: int) -> int:
    """A table's 8-bit block: TABLE_BLOCK, or the largest power of two in a narrower row (a tiny config's)."""
    return min(TABLE_BLOCK, 1 << (columns.bit_length() - 1))


def _ggml_type(types: dict[str, str], name: str, tied: bool) -> str:
    """The GGUF type of a graph weight, by its Hugging Face name (the graph's names are those of the model with
    its head: `model.` + the checkpoint's); the tied table is lm_head's in the GGUF, or the embedding's."""
    hf = ["lm_head.weight", "model.embed_tokens.weight"] if tied else [name.removeprefix("model.")]
    for candidate in hf:
        if candidate in types:
            return types[candidate]
    raise ValueError(f"the GGUF holds no tensor for the graph weight {name!r} (looked for {', '.join(hf)}); "
                     "export from the GGUF the weights came from")


def _carried(weight: np.ndarray, ggml_type: str, lookup: bool = False) -> Blocks | None:
    """A GGUF tensor's blocks in MatMulNBits: the GGML_EXACT formats as they are; float tensors stay float; Q4_K
    and Q4_1 (16 levels from a minimum per block of 32, which an integer zero point cannot hold) as 4-bit blocks
    with a float offset per block (`grid_blocks`: within 1/100 of a step; a table also looked up takes 8 bits, as
    GatherBlockQuantized adds no offsets); Q6_K (a signed 6-bit value times a scale per 16) as symmetric 8-bit blocks,
    by Q8_0's rule; the other k-quants (Q5_K: 32 levels from a minimum) as 8-bit blocks with a zero point, within
    1/16 of their own step."""
    if ggml_type in GGML_EXACT:
        return ggml_blocks(weight, ggml_type)
    if ggml_type in ("F32", "F16", "BF16"):
        return None
    if ggml_type in ("Q4_K", "Q4_1") and weight.shape[0] % GGML_BLOCK == 0 and not lookup:
        return grid_blocks(weight)
    if ggml_type == "Q6_K":
        return ggml_blocks(weight, "Q8_0")
    return int8_blocks(weight, GGML_BLOCK)


def quantizable(shape) -> bool:
    """Whether a weight of this shape is quantized: a matrix, not a small folded constant (RoPE's inv_freq) nor a
    projection narrower than 16 (a tiny config's)."""
    return len(shape) == 2 and min(shape) >= 16


def _table_blocks(table: np.ndarray, bits: int, quant: QuantSpec, rows: int = 16384) -> Blocks:
    """A lookup table [vocab, columns] as blocks along its columns (each row one output of the [columns, vocab]
    weight the quantizers take), `rows` rows at a time: no transposed copy of the whole table is made."""
    parts = []
    for start in range(0, table.shape[0], rows):
        parts.append(_rounded(np.ascontiguousarray(table[start:start + rows].T), bits, quant, lookup=True))
    first = parts[0]
    zero_points = None if first.zero_points is None else np.concatenate([b.zero_points for b in parts])
    return Blocks(np.concatenate([b.packed for b in parts]), np.concatenate([b.scales for b in parts]), zero_points,
                  first.bits, first.block_size, first.K)


def _lookup_tables(graph) -> list:
    """(Gather(axis 0), its [vocab, columns] initializer) for every table the graph only looks rows up in (Gemma 4's
    per-layer embeddings; the tied table is looked up on axis 1 and multiplied by, and is not one of them)."""
    tables = []
    for value in graph.initializers.values():
        uses = list(value.uses())
        if (len(uses) == 1 and uses[0][0].op_type == "Gather" and uses[0][1] == 0 and value.const_value is not None
                and uses[0][0].attributes.get_int("axis", 0) == 0 and quantizable(value.shape)):
            tables.append((uses[0][0], value))
    return tables


def _weight_of(node):
    """The constant [K, N] weight a MatMul multiplies by, if it is quantizable."""
    value = node.inputs[1]
    if value is None or value.const_value is None or not quantizable(value.shape):
        return None
    return value


def _tied_embedding(graph):
    """(the [hidden, vocab] initializer, its lookup Gather(axis=1)) when lm_head and the embedding share it."""
    for value in graph.initializers.values():
        users = {node.op_type: node for node, _ in value.uses()}
        gather = users.get("Gather")
        if "MatMul" in users and gather is not None and gather.attributes.get_int("axis", 0) == 1:
            return value, gather
    return None


class _MatMulNBits:
    """ONNX Runtime's contrib operators: MatMulNBits, and GatherBlockQuantized for the tied lookup."""

    def __init__(self, graph, options: QuantSpec):
        self.graph = graph
        self.options = options

    def _init(self, name: str, array: np.ndarray):
        return _initializer(self.graph, name, array)

    def _weights(self, blocks: Blocks, base: str, dtype):
        packed = self._init(f"{base}_Q{blocks.bits}", blocks.packed)
        if blocks.scales.dtype == np.float16 and np.dtype(dtype) != np.float16:
            scales = self._widened(self._init(f"{base}_scales", blocks.scales), dtype)
        else:
            scales = self._init(f"{base}_scales", blocks.scales.astype(dtype))
        zero_points = None
        if blocks.zero_points is not None:
            zp = blocks.zero_points if blocks.zero_points.dtype == np.uint8 else blocks.zero_points.astype(dtype)
            zero_points = self._init(f"{base}_zero_points", zp)
        return packed, scales, zero_points

    def _widened(self, stored, dtype):
        """Scales exact in float16 (Blocks) stored so, half the bytes, and cast to the graph's type by a node at the
        graph's start (before the table's lookup, which reads them too); ONNX Runtime folds it when it loads."""
        import onnx_ir as ir

        wide = ir.DataType.from_numpy(np.dtype(dtype))
        output = ir.Value(name=f"{stored.name}_{wide.name.lower()}", type=ir.TensorType(wide), shape=stored.shape)
        cast = ir.node("Cast", [stored], {"to": wide}, name=f"{stored.name}_widen", outputs=[output])
        self.graph.insert_before(next(iter(self.graph)), [cast])
        return output

    def matmul(self, node, blocks: Blocks, value) -> None:
        import onnx_ir as ir

        base, dtype = value.name, value.const_value.numpy().dtype
        stored = blocks if blocks.offsets is None else _with_block_sums(blocks)
        packed, scales, zero_points = self._weights(stored, base, dtype)
        self.cache = (packed, scales, zero_points)
        inputs = [node.inputs[0], packed, scales] + ([zero_points] if zero_points is not None else [])
        attributes = {"K": blocks.K, "N": stored.packed.shape[0], "bits": blocks.bits, "block_size": blocks.block_size}
        if self.options.accuracy_level:
            attributes["accuracy_level"] = self.options.accuracy_level
        new = [ir.node("MatMulNBits", inputs, attributes, domain="com.microsoft", name=f"{node.name}_Q{blocks.bits}")]
        if blocks.offsets is not None:
            new += self._offsets(new[0].outputs[0], blocks, base, dtype, node.outputs[0])
        _replace(self.graph, node, new)

    def _offsets(self, out, blocks: Blocks, base: str, dtype, product) -> list:
        """x @ W = MatMulNBits' product + (x's sum over each block) @ the blocks' offsets: the product's last
        K_blocks columns are those sums (`_with_block_sums`), Split off and multiplied by the offsets [K_blocks, N]
        (float16, widened like the scales)."""
        import onnx_ir as ir

        N, k_blocks = blocks.offsets.shape
        widths = self._init(f"{base}_split", np.array([N, k_blocks], np.int64))
        split = ir.node("Split", [out, widths], {"axis": -1}, num_outputs=2, name=f"{base}_split")
        offsets = self._widened(self._init(f"{base}_offsets", np.ascontiguousarray(blocks.offsets.T)), dtype)
        correction = ir.node("MatMul", [split.outputs[1], offsets], name=f"{base}_offsets")
        for value in (split.outputs[0], correction.outputs[0]):  # the product's shape: the norm after it fuses the Add
            value.shape, value.type = product.shape, product.type
        return [split, correction, ir.node("Add", [split.outputs[0], correction.outputs[0]], name=f"{base}_add")]

    def table(self, gather, blocks: Blocks, base: str, dtype) -> None:
        """Gather(T [V, C], ids) -> [ids.., C] becomes GatherBlockQuantized on T's rows, packed."""
        import onnx_ir as ir

        packed, scales, zero_points = self._weights(blocks, base, dtype)
        packed.const_value = ir.tensor(blocks.packed.reshape(blocks.packed.shape[0], -1), name=packed.name)
        packed.shape = ir.Shape(packed.const_value.shape)
        inputs = [packed, gather.inputs[1], scales] + ([zero_points] if zero_points is not None else [])
        lookup = ir.node("GatherBlockQuantized", inputs,
                         {"bits": blocks.bits, "block_size": blocks.block_size, "gather_axis": 0, "quantize_axis": 1},
                         domain="com.microsoft", name=f"{gather.name}_Q{blocks.bits}")
        _replace(self.graph, gather, [lookup, *self._cut(lookup.outputs[0], blocks, base)])

    def _cut(self, out, blocks: Blocks, base: str) -> list:
        """A Slice cutting the padding of the last block off the rows, if any (none when blocks divide them)."""
        import onnx_ir as ir

        if blocks.K % blocks.block_size == 0:
            return []
        bounds = [self._init(f"{base}_slice_{k}", np.array([v], np.int64))
                  for k, v in (("start", 0), ("end", blocks.K), ("axis", -1))]
        return [ir.node("Slice", [out, *bounds])]

    def lookup(self, gather, blocks: Blocks, base: str, dtype) -> None:
        """Gather(E [H, V], ids, axis=1) -> [H, ids..] becomes GatherBlockQuantized on the packed rows of E^T,
        then a Transpose back to the layout the graph's next node (a Transpose to [.., H]) expects."""
        import onnx_ir as ir

        packed, scales, zero_points = self.cache
        N = blocks.packed.shape[0]
        shape = self._init(f"{base}_rows_shape", np.array([N, -1], np.int64))
        rows = ir.node("Reshape", [packed, shape], name=f"{base}_rows")
        inputs = [rows.outputs[0], gather.inputs[1], scales] + ([zero_points] if zero_points is not None else [])
        lookup = ir.node("GatherBlockQuantized", inputs,
                         {"bits": blocks.bits, "block_size": blocks.block_size, "gather_axis": 0, "quantize_axis": 1},
                         domain="com.microsoft", name=f"{gather.name}_Q{blocks.bits}")
        new = [rows, lookup, *self._cut(lookup.outputs[0], blocks, base)]
        out = new[-1].outputs[0]
        ids_rank = len(gather.inputs[1].shape) if gather.inputs[1].shape is not None else 1
        back = ir.node("Transpose", [out], {"perm": [ids_rank, *range(ids_rank)]})  # [ids.., H] -> [H, ids..]
        new.append(back)
        _replace(self.graph, gather, new)


class _QDQ:
    """Standard ONNX: DequantizeLinear (opset 21, blocked, int4) feeding the original MatMul / Gather."""

    def __init__(self, graph, options: QuantSpec):
        self.graph = graph
        self.options = options
        if graph.opset_imports.get("", 0) < 21:  # blocked DequantizeLinear and int4 tensors: opset 21
            graph.opset_imports[""] = 21

    def matmul(self, node, blocks: Blocks, value) -> None:
        import onnx_ir as ir

        base, dtype = value.name, value.const_value.numpy().dtype
        q, scales = blocks.int4_kn()
        q_value = _initializer(self.graph, f"{base}_int4", q, ir.DataType.INT4)
        s_value = _initializer(self.graph, f"{base}_scales", scales.astype(dtype))
        dq = ir.node("DequantizeLinear", [q_value, s_value], {"axis": 0, "block_size": blocks.block_size},
                     name=f"{base}_DQ")
        uses = list(value.uses())  # the MatMul and, when tied, the lookup Gather at the top of the graph
        users = {user for user, _ in uses}
        self.graph.insert_before(next(n for n in self.graph if n in users), [dq])  # kept in topological order
        for user, index in uses:
            user.replace_input_with(index, dq.outputs[0])

    def lookup(self, gather, blocks: Blocks, base: str, dtype) -> None:
        pass  # the Gather already reads the DequantizeLinear output (rewired in `matmul`)

    def table(self, gather, blocks: Blocks, base: str, dtype) -> None:
        """Gather(T [V, C], ids) reads DequantizeLinear(int4 [V, C], scales [V, C/bs], axis 1)."""
        import onnx_ir as ir

        q, scales = blocks.int4_kn()  # [C, V], [C/bs, V]
        q_value = _initializer(self.graph, f"{base}_int4", np.ascontiguousarray(q.T), ir.DataType.INT4)
        s_value = _initializer(self.graph, f"{base}_scales", np.ascontiguousarray(scales.T).astype(dtype))
        dq = ir.node("DequantizeLinear", [q_value, s_value], {"axis": 1, "block_size": blocks.block_size},
                     name=f"{base}_DQ")
        self.graph.insert_before(gather, [dq])
        gather.replace_input_with(0, dq.outputs[0])


def _with_block_sums(blocks: Blocks) -> Blocks:
    """The blocks with K_blocks more output columns, each the sum of the input over one block: 1 at that block's
    rows and 0 elsewhere (scale 1, zero point 0), exact in 4 bits."""
    N, k_blocks, width = blocks.packed.shape
    ones = np.eye(k_blocks, dtype=np.uint8)[..., None] * np.uint8(0x11)  # two 1s a byte: the block's row
    sums = np.broadcast_to(ones, (k_blocks, k_blocks, width))
    zero = np.zeros((k_blocks, blocks.zero_points.shape[1]), np.uint8)
    return Blocks(np.concatenate([blocks.packed, sums]),
                  np.concatenate([blocks.scales, np.ones((k_blocks, k_blocks), blocks.scales.dtype)]),
                  np.concatenate([blocks.zero_points, zero]), blocks.bits, blocks.block_size, blocks.K)


def _initializer(graph, name: str, array: np.ndarray, dtype=None):
    """Register `array` as the graph initializer `name` (stored as `dtype` when given, e.g. INT4)."""
    import onnx_ir as ir

    tensor = ir.Tensor(array, dtype=dtype, name=name) if dtype is not None else ir.tensor(array, name=name)
    value = ir.Value(name=name, const_value=tensor)
    value.shape, value.type = ir.Shape(array.shape), ir.TensorType(tensor.dtype)
    graph.register_initializer(value)
    return value


def _replace(graph, old, new: list) -> None:
    import onnx_ir as ir

    ir.convenience.replace_nodes_and_values(graph, old, [old], new, list(old.outputs), [new[-1].outputs[0]])
