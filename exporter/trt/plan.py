"""The TensorRT build plan: everything about an engine that can be decided and checked without a GPU.

    plan = make_plan(graph, manifest, BuildLimits(max_batch_size=4, max_input_len=512, max_length=2048))
    plan.to_dict()   stored in manifest["trt"]["plan"] before the build starts
    plan.table()     printed by gemma-export

Two optimization profiles, as TensorRT-Edge-LLM builds its engines: one for prefill (many new tokens,
little or no past), one for decode (one new token over a past of any length). Each graph dimension
gets a [min, opt, max] range from the limits; the graph's symbolic dimension names (exporter/trace.py:
batch_size, sequence_length, past_sequence_length, total_sequence_length) say which range applies, and
every corner of a profile keeps total = past + new, because TensorRT checks the shape constraints of
the network at the profile's corners.

    prefill   new 1..max_input_len, past 0..max_length - max_input_len, total 1..max_length
    decode    new 1,                past 0..max_length - 1,               total 1..max_length

Byte counts: the KV cache at max batch and max length (and the device buffers the runtime allocates
for it: two sets, swapped each step, unless past and present share one), the logits buffer, and the
graph's weights by precision, read from its initializers without loading their data.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from .operators import check_graph

PREFILL, DECODE = "prefill", "decode"
DEFAULT_OPTIMIZATION_LEVEL = 3  # TensorRT's own default: IBuilderConfig.builder_optimization_level
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
ONNX_NAMES = {"float32": "float", "float16": "float16", "bfloat16": "bfloat16"}  # TensorProto.DataType, lowercase
# bits per element of an initializer, by ONNX TensorProto data type
_BITS = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.BFLOAT16: 16,
         onnx.TensorProto.DOUBLE: 64, onnx.TensorProto.INT64: 64, onnx.TensorProto.INT32: 32,
         onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.BOOL: 8,
         onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}


@dataclass(frozen=True)
class BuildLimits:
    """What the engine must serve: --max-batch-size, --max-input-len (prompt tokens in one prefill)
    and --max-length (prompt + generated tokens: the KV cache slots)."""

    max_batch_size: int = 1
    max_input_len: int = 512
    max_length: int = 2048

    def check(self) -> None:
        for name in ("max_batch_size", "max_input_len", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")
        if self.max_input_len > self.max_length:
            raise ValueError(f"--max-input-len {self.max_input_len} exceeds --max-length {self.max_length}: "
                             "a prompt must leave room in the context; lower it or raise --max-length")


@dataclass(frozen=True)
class Profile:
    """An optimization profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def contains(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether every given input shape lies within this profile's [min, max] box."""
        for name, shape in shapes.items():
            low, _, high = self.shapes[name]
            if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
                return False
        return True


@dataclass
class BuildPlan:
    limits: BuildLimits
    profiles: list[Profile]
    precision: str  # the graph's float type; the network is strongly typed (see build.py)
    kv_cache_bytes: int  # keys and values of every layer at max batch and max length
    kv_buffer_bytes: int  # what the runtime allocates on the device for them
    logits_buffer_bytes: int
    weight_bytes: dict[str, int]  # by ONNX element type of the initializers
    operators: dict = field(default_factory=dict)  # OperatorCheck.to_dict()
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL

    @property
    def supported(self) -> bool:
        return not self.operators.get("unsupported")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["profiles"] = [{"name": p.name, "shapes": {k: [list(s) for s in v] for k, v in p.shapes.items()}}
                            for p in self.profiles]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "BuildPlan":
        profiles = [Profile(p["name"], {k: tuple(tuple(s) for s in v) for k, v in p["shapes"].items()})
                    for p in data["profiles"]]
        return cls(**{**data, "limits": BuildLimits(**data["limits"]), "profiles": profiles})

    def table(self) -> str:
        gib = 2**30
        lines = [
            f"TensorRT build plan ({self.precision}, strongly typed, optimization level {self.optimization_level}):",
            f"  limits: batch <= {self.limits.max_batch_size}, prompt <= {self.limits.max_input_len}, "
            f"context <= {self.limits.max_length} tokens",
        ]
        for profile in self.profiles:
            lines.append(f"  profile {profile.name}:")
            for name, (low, opt, high) in profile.shapes.items():
                if name.startswith("past_key_values.") and not name.startswith("past_key_values.0.key"):
                    continue  # every layer has the same ranges as layer 0
                lines.append(f"    {name:<24} min {list(low)}  opt {list(opt)}  max {list(high)}")
        lines.append(f"  KV cache at max batch and length: {self.kv_cache_bytes / gib:.3f} GiB "
                     f"(device buffers {self.kv_buffer_bytes / gib:.3f} GiB); logits buffer "
                     f"{self.logits_buffer_bytes / gib:.3f} GiB")
        lines.append("  weights: " + ", ".join(f"{t} {b / gib:.3f} GiB" for t, b in self.weight_bytes.items()))
        unsupported = self.operators.get("unsupported") or {}
        lines.append(f"  operators: {sum((self.operators.get('counts') or {}).values())} nodes, "
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


def spec_inputs(manifest: dict) -> dict[str, list[str | int]]:
    """The inputs exporter/trace.py gives a decoder graph described by `manifest` (before it is traced)."""
    kv = manifest["kv_cache"]
    past = kv["max_length"] if kv["layout"] == "static" else "past_sequence_length"
    inputs = {"input_ids": ["batch_size", "sequence_length"], "attention_mask": ["batch_size", "total_sequence_length"],
              "position_ids": ["batch_size", "sequence_length"]}
    for name in manifest["io"]["inputs"][len(inputs):]:
        inputs[name] = ["batch_size", kv["num_kv_heads"], past, kv["head_dim"]]
    return inputs


def make_profiles(inputs: dict[str, list[str | int]], limits: BuildLimits, with_past: bool) -> list[Profile]:
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
    return profiles


def kv_cache_bytes(kv: dict, limits: BuildLimits) -> int:
    """Keys and values of every layer, [max_batch, kv_heads, max_length, head_dim] each."""
    per_token = 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * ITEMSIZE[kv["dtype"]]
    return per_token * limits.max_batch_size * limits.max_length


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


def make_plan(graph_path: str | Path | None, manifest: dict, limits: BuildLimits,
              optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL, estimated_weights: dict | None = None) -> BuildPlan:
    """The plan for the artifact's graph (manifest: the artifact's manifest as a dict). Without a graph
    (gemma-export --plan-only) the inputs follow the manifest, the weights are `estimated_weights` and the
    operators are checked at export."""
    limits.check()
    if not 0 <= optimization_level <= 5:
        raise ValueError(f"--optimization-level {optimization_level} is out of range; TensorRT accepts 0..5 (default 3)")
    graph = onnx.load(str(graph_path), load_external_data=False) if graph_path is not None else None
    with_past = manifest["task"] == "text-generation"
    kv = manifest.get("kv_cache") or {}
    if with_past and kv.get("layout") == "static" and kv["max_length"] < limits.max_length:
        raise ValueError(f"--max-length {limits.max_length} exceeds the static KV cache of {kv['max_length']} "
                         "slots this graph was exported with; lower it or export with a larger --max-length")
    context = manifest.get("config", {}).get("max_position_embeddings")
    if context and limits.max_length > context:
        raise ValueError(f"--max-length {limits.max_length} exceeds the model's context of {context} tokens")
    slots = limits if kv.get("layout") != "static" else BuildLimits(limits.max_batch_size, 1, kv["max_length"])
    kv_bytes = kv_cache_bytes(kv, slots) if with_past else 0
    buffer_sets = 1 if kv.get("shares_buffers") else 2
    vocab = manifest["config"]["vocab_size"]
    logit_rows = limits.max_input_len if manifest.get("logits", "all") == "all" else 1
    return BuildPlan(
        limits=limits,
        profiles=make_profiles(graph_inputs(graph) if graph else spec_inputs(manifest), limits, with_past),
        precision=manifest["dtype"],
        kv_cache_bytes=kv_bytes,
        kv_buffer_bytes=kv_bytes * buffer_sets,
        logits_buffer_bytes=limits.max_batch_size * logit_rows * vocab * 4,
        weight_bytes=weight_bytes(graph) if graph else dict(estimated_weights or {}),
        operators=check_graph(graph).to_dict() if graph else {},
        optimization_level=optimization_level,
    )


def estimate_weight_bytes(config, dtype: str, quant=None, table_dtype: str | None = None) -> dict[str, int]:
    """The weights a graph of `config` will hold, by element type, before it is traced: the MatMul weights
    and the tied embedding in `dtype` (the embedding in `table_dtype` if given; or int4/int8 blocks with their
    scales and zero points under `quant`, exporter.quantize.QuantOptions), the norm weights in float32 (our
    fp16/bf16 graphs compute the norms in float32). Constants (rotary tables, shapes) are left out: a few KB."""
    H, D, L = config.hidden_size, config.head_dim, config.num_hidden_layers
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    matmul = L * (H * q + 2 * H * kv + q * H + 3 * H * config.intermediate_size)
    embedding = config.vocab_size * H
    norms_per_layer = 2 if config.model_type == "gemma" else 4  # Gemma 2 and 3 add pre/post-feedforward norms
    norms = L * norms_per_layer * H + H + (L * 2 * D if config.model_type == "gemma3_text" else 0)  # + q/k norms
    size, name = ITEMSIZE[dtype], ONNX_NAMES[dtype]
    table_size, table_name = ITEMSIZE[table_dtype or dtype], ONNX_NAMES[table_dtype or dtype]
    totals: Counter = Counter({"float": 4 * norms})
    if quant is None:
        totals[name] += size * matmul
        totals[table_name] += table_size * embedding
        return dict(totals.most_common())
    blocks = lambda count: count // quant.block_size  # noqa: E731 (rows divide by the block size)
    totals["int4"] += matmul // 2
    totals[name] += size * blocks(matmul)
    if not quant.symmetric:
        totals["int4"] += blocks(matmul) // 2
    if quant.lm_head == "float":
        totals[table_name] += table_size * embedding
    else:  # the scales take the table's dtype
        kind, per = ("int4", 2) if quant.lm_head == "int4" else ("int8", 1)
        totals[kind] += embedding // per
        totals[table_name] += table_size * blocks(embedding)
        if not quant.symmetric:
            totals[kind] += blocks(embedding) // per
    return dict(totals.most_common())
