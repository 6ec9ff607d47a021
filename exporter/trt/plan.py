"""The TensorRT build plan: everything about an engine that can be decided and checked without a GPU.

    plan = make_plan(graph, spec)   a TrtPlan, stored in the manifest ("plan") before the build starts
    plan_table(spec, plan)          printed by gemma-export

Two optimization profiles, as TensorRT-Edge-LLM builds its engines: one for prefill (many new tokens,
little or no past), one for decode (one new token over a past of any length). Each graph dimension
gets a [min, opt, max] range from the limits; the graph's symbolic dimension names (exporter/trace.py:
batch_size, sequence_length, past_sequence_length, total_sequence_length) say which range applies, and
every corner of a profile keeps total = past + new, because TensorRT checks the shape constraints of
the network at the profile's corners.

    prefill   new 1..max_input_len, past 0..max_length - max_input_len, total 1..max_length
    decode    new 1,                past 0..max_length - 1,               total 1..max_length

Byte counts: the KV cache at max batch and max length, a ring's slots for sliding-window layers on one (and the
device buffers the runtime allocates for it: one set written in place in the static layout, two swapped each step
in the dynamic one), the logits
buffer, and the
graph's weights by precision, read from its initializers without loading their data.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import onnx

from runtime.manifest import Profile, TrtPlan
from runtime.spec import ITEMSIZE, ArtifactSpec, BuildLimits, KVSpec, ModelSpec, PrecisionSpec, QuantSpec

from .operators import check_graph

log = logging.getLogger(__name__)

PREFILL, DECODE = "prefill", "decode"
ONNX_NAMES = {"fp32": "float", "fp16": "float16", "bf16": "bfloat16"}  # TensorProto.DataType, lowercase
# bits per element of an initializer, by ONNX TensorProto data type
_BITS = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.BFLOAT16: 16,
         onnx.TensorProto.DOUBLE: 64, onnx.TensorProto.INT64: 64, onnx.TensorProto.INT32: 32,
         onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.BOOL: 8,
         onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}


def plan_table(spec: ArtifactSpec, plan: TrtPlan) -> str:
    """The plan as gemma-export prints it."""
    gib, limits = 2**30, spec.trt.limits
    lines = [
        f"TensorRT build plan ({spec.precision.dtype}, strongly typed, optimization level "
        f"{spec.trt.optimization_level}):",
        f"  limits: batch <= {limits.max_batch_size}, prompt <= {limits.max_input_len}, "
        f"context <= {limits.max_length} tokens",
    ]
    for profile in plan.profiles:
        lines.append(f"  profile {profile.name}:")
        shown = set()
        for name, (low, opt, high) in profile.shapes.items():
            if name.startswith("past_key_values."):
                if (tuple(low), tuple(high)) in shown or not name.endswith(".key"):
                    continue  # layers with the same ranges as one already shown (a ring's, or a global layer's)
                shown.add((tuple(low), tuple(high)))
            lines.append(f"    {name:<24} min {list(low)}  opt {list(opt)}  max {list(high)}")
    ring = spec.kv.ring_size if spec.kv else None
    if ring:
        lines.append(f"  sliding-window layers {list(spec.kv.ring_layers)} on a ring of {ring} slots "
                     f"(window {spec.kv.sliding_window} + a chunk of {spec.kv.ring_chunk})")
    lines.append(f"  KV cache at max batch and length: {plan.kv_cache_bytes / gib:.3f} GiB "
                 f"(device buffers {plan.kv_buffer_bytes / gib:.3f} GiB); logits buffer "
                 f"{plan.logits_buffer_bytes / gib:.3f} GiB")
    lines.append("  weights: " + ", ".join(f"{t} {b / gib:.3f} GiB" for t, b in plan.weight_bytes.items()))
    unsupported = plan.operators.get("unsupported") or {}
    lines.append(f"  operators: {sum((plan.operators.get('counts') or {}).values())} nodes, "
                 + ("all parsed by TensorRT" if not unsupported else
                    "NOT supported by TensorRT: " + "; ".join(f"{op}: {why}" for op, why in unsupported.items())))
    return "\n".join(lines)


def profile_ranges(limits: BuildLimits) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Per profile, the (min, opt, max) of each symbolic dimension of the graph."""
    B, prompt, context = limits.max_batch_size, limits.max_input_len, limits.max_length
    batch = (1, (B + 1) // 2, B)
    opt_prompt = max(1, prompt // 2)
    opt_past = max(0, context // 2 - 1)
    return {
        PREFILL: {"batch_size": batch, "sequence_length": (1, opt_prompt, prompt),
                  "past_sequence_length": (0, 0, context - prompt),
                  "total_sequence_length": (1, opt_prompt, context)},
        DECODE: {"batch_size": batch, "sequence_length": (1, 1, 1),
                 "past_sequence_length": (0, opt_past, context - 1),
                 "total_sequence_length": (1, opt_past + 1, context)},
    }


def graph_inputs(graph: onnx.ModelProto) -> dict[str, list[str | int]]:
    """Each graph input's dimensions: a symbolic name or a fixed size."""
    return {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in graph.graph.input}


def spec_inputs(spec: ArtifactSpec) -> dict[str, list[str | int]]:
    """The inputs exporter/trace.py gives a decoder graph of this spec (before it is traced)."""
    inputs = {"input_ids": ["batch_size", "sequence_length"], "attention_mask": ["batch_size", "total_sequence_length"],
              "position_ids": ["batch_size", "sequence_length"]}
    kv = spec.kv
    if kv is not None:
        for name, (heads, slots, head_dim) in kv.shapes_by_name.items():  # static: a ring's slots, or max_length
            inputs[name] = ["batch_size", heads, slots or "past_sequence_length", head_dim]
    return inputs


def make_profiles(inputs: dict[str, list[str | int]], limits: BuildLimits, with_past: bool) -> tuple[Profile, ...]:
    ranges = profile_ranges(limits)
    profiles = []
    for name in [PREFILL, DECODE] if with_past else [PREFILL]:
        shapes = {}
        for input_name, dims in inputs.items():
            corners = []
            for dim in dims:
                if isinstance(dim, str) and dim not in ranges[name]:
                    raise ValueError(f"graph input {input_name} has dimension {dim!r}, which no build limit covers "
                                     f"(known: {', '.join(ranges[name])}); export the graph again")
                corners.append(ranges[name][dim] if isinstance(dim, str) else (dim,) * 3)
            shapes[input_name] = tuple(tuple(c[i] for c in corners) for i in range(3))
        profiles.append(Profile(name, shapes))
    return tuple(profiles)


def kv_cache_bytes(kv: KVSpec, limits: BuildLimits) -> int:
    """Keys and values of every storing layer (Gemma 4's KV-shared layers hold none) at the engine's largest batch,
    [max_batch, kv_heads, slots, head_dim] each: the static layout's slots per layer (a ring's for sliding-window
    layers on one), else max_length."""
    if kv.layout == "static":
        return limits.max_batch_size * kv.bytes_per_row()
    return kv.bytes_per_token() * limits.max_batch_size * limits.max_length


def weight_bytes(graph: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the graph's initializers by element type (their data stays on disk). Scalars (the embedding
    scale, soft-caps, shapes) are constants, not weights."""
    totals: Counter = Counter()
    for tensor in graph.graph.initializer:
        count = 1
        for d in tensor.dims:
            count *= d
        if count <= 1:
            continue
        totals[onnx.TensorProto.DataType.Name(tensor.data_type).lower()] += (count * _BITS[tensor.data_type] + 7) // 8
    return dict(totals.most_common())


def make_plan(graph_path: str | Path | None, spec: ArtifactSpec, estimated_weights: dict | None = None) -> TrtPlan:
    """The plan for the graph of `spec` at `graph_path`. Without a graph (gemma-export --plan-only) the inputs
    follow the spec, the weights are `estimated_weights` and the operators are checked at export."""
    limits, kv = spec.trt.limits, spec.kv
    graph = onnx.load(str(graph_path), load_external_data=False) if graph_path is not None else None
    static = kv is not None and kv.layout == "static"
    kv_bytes = kv_cache_bytes(kv, limits) if kv is not None else 0
    buffer_sets = 1 if static else 2  # the static layout writes in place; the dynamic one swaps two sets
    logit_rows = limits.max_input_len if spec.graph.logits == "all" else 1
    return TrtPlan(
        profiles=make_profiles(graph_inputs(graph) if graph else spec_inputs(spec), limits, kv is not None),
        kv_cache_bytes=kv_bytes,
        kv_buffer_bytes=kv_bytes * buffer_sets,
        logits_buffer_bytes=limits.max_batch_size * logit_rows * spec.model.vocab_size * 4,
        weight_bytes=weight_bytes(graph) if graph else dict(estimated_weights or {}),
        operators=check_graph(graph).to_dict() if graph else {},
    )


def plan_engine(model: str | Path, options) -> tuple[ArtifactSpec, TrtPlan]:
    """The TensorRT build plan of `model` before anything is exported or loaded (gemma-export --plan-only):
    profiles, KV cache bytes, and the weight bytes estimated from the config. Reads the config only."""
    from models.loading import resolve as resolve_checkpoint
    from runtime.spec import resolve

    if options.target != "trt":
        raise ValueError(f"--plan-only plans a TensorRT engine: pass --target trt (not {options.target!r})")
    config = resolve_checkpoint(model).config
    spec = resolve(options, ModelSpec.from_config(config))
    weights = estimate_weight_bytes(config, spec.precision, spec.quant)
    return spec, make_plan(None, spec, estimated_weights=weights)


def estimate_weight_bytes(config, precision: PrecisionSpec, quant: QuantSpec | None = None) -> dict[str, int]:
    """The weights a graph of `config` will hold, by element type, before it is traced, counted on the model built
    on the meta device (no memory): the MatMul weights in the precision's dtype and the tied embedding in its
    table's (or int4/int8 blocks with their scales and zero points under `quant`, Gemma 4's per-layer table as the
    tied one), the norm weights and other vectors in float32 (our fp16/bf16 graphs compute the norms in float32),
    in the dtype what is not quantized: Gemma 4's experts (MatMulNBits takes one [K, N] weight, not a batch of
    them) and weights narrower than 16. Constants (rotary tables, shapes) are left out: a few KB."""
    import torch

    from models.families import task_class

    from ..quantize import quantizable

    with torch.device("meta"):
        model = task_class(config, "text-generation")(config)
    counts: Counter = Counter()
    for name, p in model.named_parameters():  # the tied lm_head once: it is the embedding
        kind = ("table" if name.endswith("embed_tokens.weight") else "per_layer_table" if "embed_tokens_per_layer" in name
                else "matmul" if quantizable(p.shape) else "float" if p.dim() == 1 else "unquantized")
        counts[kind] += p.numel()
    size, name = ITEMSIZE[precision.dtype], ONNX_NAMES[precision.dtype]
    table_size, table_name = ITEMSIZE[precision.vocab_table], ONNX_NAMES[precision.vocab_table]
    totals: Counter = Counter({"float": 4 * counts["float"]})
    totals[name] += size * counts["unquantized"]
    if quant is None:
        totals[name] += size * (counts["matmul"] + counts["per_layer_table"])
        totals[table_name] += table_size * counts["table"]
        return dict(totals.most_common())
    blocks = lambda count: count // quant.block_size  # noqa: E731 (rows divide by the block size)
    totals["int4"] += counts["matmul"] // 2
    totals[name] += size * blocks(counts["matmul"])
    if not quant.symmetric:
        totals["int4"] += blocks(counts["matmul"]) // 2
    for table, scale_size, scale_name in (("table", table_size, table_name), ("per_layer_table", size, name)):
        if quant.lm_head == "float":
            totals[scale_name] += scale_size * counts[table]
            continue
        kind, per = ("int4", 2) if quant.lm_head == "int4" else ("int8", 1)  # the scales take the table's dtype
        totals[kind] += counts[table] // per
        totals[scale_name] += scale_size * blocks(counts[table])
        if not quant.symmetric:
            totals[kind] += blocks(counts[table]) // per
    return dict((k, v) for k, v in totals.most_common() if v)
