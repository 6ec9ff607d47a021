"""The artifact spec: what an export is, typed, with every default applied in one place.

    spec = resolve(options, ModelSpec.from_config(config))   the exporter: the options a user gave, resolved
    spec.graph, spec.kv, spec.precision, spec.quant, spec.trt each stage reads its section
    Manifest(spec, results...)                               manifest.json: the spec and what the stages produced

Every option has one spelling, the one the command line takes (`--dtype fp16` is "fp16" in the options, the spec
and manifest.json); what a backend or a framework calls the same type comes from `ELEMENT_TYPE` here. The
sections validate themselves when read back (`load_section`), so a manifest naming a value the runtime does not
know is refused with the field, the value and what is accepted.

Imports the standard library only: the exporter writes it and the runtime reads it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

TASKS = ("text-generation", "feature-extraction", "sequence-classification", "token-classification")
TARGETS = ("onnx", "ort", "trt")  # standard ONNX; fused for ONNX Runtime; standard ONNX in TensorRT's forms
FAMILIES = ("gemma", "gemma2", "gemma3_text", "gemma4_text")
KV_LAYOUTS = ("dynamic", "static")  # past grows each step; buffers of max_length slots written in place
# static layout: a sliding-window layer's slots: a ring, max_length of them, or GroupQueryAttention's window (--target ort)
SLIDING_CACHES = ("ring", "full", "window")
LOGITS = ("all", "last")
DTYPES = ("fp32", "fp16", "bf16")
QUANTS = ("int4",)
QUANT_METHODS = ("gptq", "rtn", "hqq", "gguf")  # gguf: a GGUF source's own blocks, carried over (its default)
QUANT_FORMATS = ("matmulnbits", "qdq")  # ONNX Runtime's MatMulNBits; blocked DequantizeLinear (TensorRT)
LM_HEAD = ("int4", "int8", "float", "gguf")  # the tied lm_head / embedding under --quant (gguf: as the GGUF has it)
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 4 quantizes activations to int8, 1 keeps float32

# The name numpy, torch and ONNX give each dtype, and its size.
ELEMENT_TYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}

DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids")
# text generation's optional input (transformers' logits_to_keep, optimum's and onnxruntime-genai's spelling): the
# graph computes the logits of that many trailing positions (1: decode; k + 1: speculative verification)
LOGITS_TO_KEEP = "num_logits_to_keep"


def choices(allowed) -> dict:
    """Field metadata: the values a section accepts for this field."""
    return {"choices": tuple(allowed)}


# -- the sections ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """The decoder's dimensions, as its Hugging Face config names them."""

    family: str = field(metadata=choices(FAMILIES))
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None
    layer_types: tuple[str, ...]
    # Gemma 4: each layer's (num_kv_heads, head_dim), and the layer whose keys and values it attends to (itself, or
    # for a KV-shared layer the last earlier one of its type). () in manifests before them: every layer as above.
    kv_shapes: tuple[tuple[int, int], ...] = ()
    kv_sources: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.kv_shapes:
            object.__setattr__(self, "kv_shapes", ((self.num_key_value_heads, self.head_dim),) * self.num_hidden_layers)
        if not self.kv_sources:
            object.__setattr__(self, "kv_sources", tuple(range(self.num_hidden_layers)))

    @classmethod
    def from_config(cls, config) -> "ModelSpec":
        """From a models/ config (or anything with the Hugging Face field names)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("family", "kv_shapes", "kv_sources")]
        values = {name: getattr(config, name) for name in names}
        layers = range(config.num_hidden_layers)
        sources = tuple(getattr(config, "kv_source", layers))
        return cls(family=config.model_type, **{**values, "layer_types": tuple(config.layer_types)},
                   kv_shapes=tuple(tuple(config.kv_shape(sources[i])) for i in layers), kv_sources=sources)

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """The layers that store keys and values, in the order of past/present (Gemma 4: not the KV-shared ones)."""
        return tuple(i for i, source in enumerate(self.kv_sources) if source == i)

    @property
    def sliding_window_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "sliding_attention")


@dataclass(frozen=True)
class GraphSpec:
    """What the graph takes and gives."""

    task: str = field(metadata=choices(TASKS))
    target: str = field(metadata=choices(TARGETS))
    logits: str = field(metadata=choices(LOGITS))  # text generation: every position's logits, or the last one's
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def with_past(self) -> bool:
        return self.task == "text-generation"

    @property
    def keeps_logits(self) -> bool:
        """Whether the graph takes num_logits_to_keep: the logits of that many trailing positions (1 for decoding,
        k + 1 to verify k drafted tokens, the chunk for perplexity)."""
        return LOGITS_TO_KEEP in self.inputs


@dataclass(frozen=True)
class KVSpec:
    """How the graph takes and gives its past keys and values, [batch, num_kv_heads, slots, head_dim] per layer that
    stores them (`layers`: every layer before Gemma 4, whose KV-shared layers read an earlier layer's: model.kv_sources).

    Static layout, `sliding_cache` "ring": a sliding-window layer keeps `ring_size` slots (the window and one chunk)
    and writes token i of a row at slot i mod ring_size; a global layer keeps max_length. A run may feed a row at
    most `chunk_limit(length)` new tokens: no more than `ring_chunk`, so that a chunk overwrites nothing its own
    queries still see, and none past the ring's end (TensorScatter's linear writes do not wrap).

    `sliding_cache` "window" (--target ort, every sliding layer fused): a sliding-window layer keeps `window_slots`
    slots, GroupQueryAttention's windowed cache (sliding_window_cache=1): after a row's T tokens its first
    `resident(T)` slots hold its latest tokens in order, and the kernel evicts (compacts) the oldest
    `window_slots - sliding_window + 1` at once when it runs out. A run takes at most `chunk_limit` new tokens (the
    kernel's scratch, not its rule)."""

    layout: str = field(metadata=choices(KV_LAYOUTS))
    max_length: int | None  # static: the most tokens a row holds (a global layer's slots)
    num_layers: int  # entries of past and present: the layers that store keys and values
    num_kv_heads: int  # the model's; `shapes` has each entry's (Gemma 4's global layers have their own)
    head_dim: int
    dtype: str = field(metadata=choices(DTYPES))
    sliding_window: int | None
    sliding_window_layers: tuple[int, ...]
    sliding_cache: str | None = field(default=None, metadata=choices(SLIDING_CACHES))  # static layout only
    ring_chunk: int | None = None  # ring: the most new tokens a run takes
    slots: tuple[int, ...] = ()  # static: each entry's slots (max_length, or the ring's); dynamic: none, it grows
    layers: tuple[int, ...] = ()  # the model layer of each entry (() in manifests before Gemma 4: entry i, layer i)
    shapes: tuple[tuple[int, int], ...] = ()  # each entry's (num_kv_heads, head_dim) ((): as above, every entry)

    def __post_init__(self):
        if not self.layers:
            object.__setattr__(self, "layers", tuple(range(self.num_layers)))
        if not self.shapes:
            object.__setattr__(self, "shapes", ((self.num_kv_heads, self.head_dim),) * self.num_layers)

    @property
    def past_names(self) -> list[str]:
        """past_key_values.{layer}.key/value: named after the model layer (Gemma 4's shared layers have none)."""
        return [f"past_key_values.{i}.{kv}" for i in self.layers for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in self.layers for kv in ("key", "value")]

    @property
    def ring_size(self) -> int | None:
        """A sliding-window layer's slots on the ring: the window and one chunk (None without a ring)."""
        return self.sliding_window + self.ring_chunk if self.sliding_cache == "ring" else None

    @property
    def ring_layers(self) -> tuple[int, ...]:
        """The storing layers whose buffers are rings."""
        return tuple(i for i in self.layers if i in self.sliding_window_layers) if self.sliding_cache == "ring" else ()

    @property
    def ring_entries(self) -> tuple[bool, ...]:
        """For each past (and present) tensor, in their order: whether its slots are a ring or a windowed cache, whose
        whole buffer is a row's state (a copy takes it all)."""
        rings = set(self.ring_layers) | set(self.window_layers)
        return tuple(layer in rings for layer in self.layers for _ in ("key", "value"))

    @property
    def window_slots(self) -> int | None:
        """A sliding-window layer's slots in GroupQueryAttention's windowed cache (None without one)."""
        return window_slots(self.sliding_window) if self.sliding_cache == "window" else None

    @property
    def window_layers(self) -> tuple[int, ...]:
        """The storing layers whose buffers are windowed caches."""
        return tuple(i for i in self.layers if i in self.sliding_window_layers) if self.sliding_cache == "window" else ()

    def resident(self, length: int) -> int:
        """The tokens a windowed cache holds after `length` (its slots 0..resident-1: the row's latest, in order), as
        ONNX Runtime's GroupQueryAttention documents it; `length` itself without a windowed cache."""
        capacity = self.window_slots
        if capacity is None or length <= capacity:
            return length
        evict = capacity - self.sliding_window + 1  # slots reclaimed at once
        return length - evict * -(-(length - capacity) // evict)

    @property
    def slots_by_name(self) -> dict[str, int | None]:
        """Slots of each past (and present) tensor, by its past name (None in the dynamic layout: the past grows)."""
        return {name: shape[1] for name, shape in self.shapes_by_name.items()}

    @property
    def shapes_by_name(self) -> dict[str, tuple[int, int | None, int]]:
        """(num_kv_heads, slots, head_dim) of each past (and present) tensor by its past name, the batch left out
        (slots None in the dynamic layout: the past grows)."""
        slots = self.slots or (None,) * self.num_layers
        entries = [(heads, n, dim) for (heads, dim), n in zip(self.shapes, slots) for _ in ("key", "value")]
        return dict(zip(self.past_names, entries))

    def bytes_per_row(self) -> int:
        """Bytes of one row's keys and values in the static layout, every entry (0 in the dynamic one)."""
        return 2 * sum(n * heads * dim for n, (heads, dim) in zip(self.slots, self.shapes)) * ITEMSIZE[self.dtype]

    def bytes_per_token(self) -> int:
        """Bytes of keys and values one token adds across the storing layers (windows not counted)."""
        return 2 * sum(heads * dim for heads, dim in self.shapes) * ITEMSIZE[self.dtype]

    def chunk_limit(self, length: int) -> int | None:
        """The most new tokens one run may feed a row that holds `length` tokens (None: no limit). A windowed cache
        takes any number, but GroupQueryAttention holds heads x new tokens x slots scores a run (16 GB for a 32k
        prompt at once on the 270M): a window's worth, at most RING_CHUNK."""
        if self.sliding_cache == "window":
            return min(self.sliding_window, RING_CHUNK)
        if self.ring_size is None:
            return None
        return min(self.ring_chunk, self.ring_size - length % self.ring_size)


@dataclass(frozen=True)
class PrecisionSpec:
    """The dtype of each kind of value in the graph. Half-precision graphs keep some of them in float32: the
    residual stream passes float16's 65504, and bfloat16's 8-bit mantissa costs top-1 agreement at each of
    these roundings (docs/precision.md)."""

    dtype: str = field(metadata=choices(DTYPES))  # the layers' weights, the projections, the KV cache
    residual: str = field(metadata=choices(DTYPES))  # residual stream, embedding scale, norms, rotary, softmax
    scores: str = field(metadata=choices(DTYPES))  # q·k
    activations: str = field(metadata=choices(DTYPES))  # gelu(gate)·up
    post_norms: str = field(metadata=choices(DTYPES))  # the sandwich norms' outputs, which feed the residual
    vocab_table: str = field(metadata=choices(DTYPES))  # the tied embedding / lm_head, and the hidden state it reads


@dataclass(frozen=True)
class QuantSpec:
    """Weight-only block quantization of every MatMul on a constant weight (exporter/quantize.py)."""

    method: str = field(metadata=choices(QUANT_METHODS))
    bits: int
    block_size: int = field(metadata=choices(BLOCK_SIZES))
    symmetric: bool
    lm_head: str = field(metadata=choices(LM_HEAD))
    format: str = field(metadata=choices(QUANT_FORMATS))
    accuracy_level: int = field(metadata=choices(ACCURACY_LEVELS))
    int8_weights: tuple[str, ...]  # weights whose name contains one of these stay in 8 bits (a mixed recipe)


@dataclass(frozen=True)
class BuildLimits:
    """What a TensorRT engine must serve: --max-batch-size, --max-input-len (prompt tokens in one prefill) and
    --max-length (prompt + generated tokens: the KV cache slots)."""

    max_batch_size: int
    max_input_len: int
    max_length: int


@dataclass(frozen=True)
class TrtSpec:
    limits: BuildLimits
    optimization_level: int = field(metadata=choices(range(6)))  # TensorRT's builder level, 0..5


@dataclass(frozen=True)
class ArtifactSpec:
    model: ModelSpec
    graph: GraphSpec
    kv: KVSpec | None  # text generation only
    precision: PrecisionSpec
    quant: QuantSpec | None
    trt: TrtSpec | None  # target trt only

    @property
    def context_length(self) -> int:
        """The most tokens a sequence may hold: the static buffers' slots, else the model's context."""
        if self.kv is not None and self.kv.layout == "static":
            return self.kv.max_length
        return self.model.max_position_embeddings


# -- resolving the options ------------------------------------------------------------------------------------


@dataclass
class ArtifactOptions:
    """What an export is asked for, as the command line spells it. None: resolve() picks from the other options."""

    target: str = "onnx"
    task: str = "text-generation"
    dtype: str | None = None  # fp16 for --target trt, fp32 otherwise
    kv_cache: str | None = None  # static for --target ort text generation, dynamic otherwise
    max_length: int | None = None  # static: the KV buffers' slots (ort: the model's context); trt: the engine's
    #                                context (the model's, <= 4096)
    sliding_cache: str | None = None  # static layout: ring where the model has sliding-window layers, else full
    logits: str = "all"
    quant: str | None = None  # int4: weight-only, exporter/quantize.py
    quant_method: str | None = None  # rtn for --target trt, else gguf for a GGUF source, else gptq
    block_size: int = 32
    symmetric: bool | None = None  # symmetric for --target trt, zero points otherwise
    lm_head: str | None = None  # int8 (Q8_0's rule on blocks of 128); int4 for --target trt
    accuracy_level: int = 4
    int8_weights: tuple[str, ...] = ()
    max_batch_size: int = 1  # --target trt: the engine's limits
    max_input_len: int | None = None  # min(512, the engine's context)
    optimization_level: int = 3  # TensorRT's own default (IBuilderConfig.builder_optimization_level)


TRT_DEFAULT_CONTEXT, TRT_DEFAULT_INPUT_LEN = 4096, 512
RING_CHUNK = 512  # the most new tokens a run feeds a ring (a sliding-window layer keeps window + this many slots)
# window: a sliding-window layer's slots beyond its window (at most the window itself). GroupQueryAttention reads the
# tokens it holds (between the window and window + this) and compacts them every WINDOW_SLACK + 1 tokens
# (docs/long-context.md)
WINDOW_SLACK = 128


def window_slots(sliding_window: int) -> int:
    """A sliding-window layer's slots in GroupQueryAttention's windowed cache (--sliding-cache window)."""
    return sliding_window + min(WINDOW_SLACK, sliding_window)
# families whose every sliding-window layer GroupQueryAttention's windowed cache can take: Gemma 4's KV-shared layers
# read an earlier layer's cache with their own attention, which a compacted window would not match
WINDOW_FAMILIES = ("gemma2", "gemma3_text")


def resolve(options: ArtifactOptions, model: ModelSpec, gguf_source: bool = False) -> ArtifactSpec:
    """The spec of the artifact `options` ask for from `model`: every default applied and every option checked
    (ValueError naming the option and what is accepted). `gguf_source`: the weights come from a GGUF (its blocks are
    then the default quantization, --quant-method gguf)."""
    o = options
    for name, allowed in (("target", TARGETS), ("task", TASKS), ("logits", LOGITS)):
        _accept(name, getattr(o, name), allowed)
    dtype = o.dtype or ("fp16" if o.target == "trt" else "fp32")
    _accept("dtype", dtype, DTYPES)
    text = o.task == "text-generation"
    if not text and (o.kv_cache not in (None, "dynamic") or o.logits != "all"):
        raise ValueError(f"--kv-cache and --logits apply to text-generation only, not to {o.task}")
    # --target ort: the static layout unless asked otherwise (the fused attention writes it in place; the dynamic
    # layout copies every cache into a new present each step), as long as the model's context unless told
    static_default = o.target == "ort" and text
    layout = o.kv_cache or ("static" if static_default else "dynamic")
    _accept("kv_cache", layout, KV_LAYOUTS)
    if layout == "static" and o.target == "ort" and o.max_length is None:
        o = dataclasses.replace(o, max_length=model.max_position_embeddings)
    o = dataclasses.replace(o, kv_cache=layout)
    if o.max_length is not None and (not _positive(o.max_length)):
        raise ValueError(f"max_length {o.max_length} must be a positive number of tokens")
    if o.max_length and o.max_length > model.max_position_embeddings:
        raise ValueError(f"max_length {o.max_length} exceeds the model's context of "
                         f"{model.max_position_embeddings} tokens")
    if o.kv_cache == "static" and not o.max_length:
        raise ValueError("--kv-cache static needs --max-length N (the size of the KV buffers)")

    kv = _kv(o, model, dtype) if text else None
    first = "last_hidden_state" if o.task == "feature-extraction" else "logits"
    # the static layout's --logits last graphs (what serving runs) return as many trailing positions as asked: one to
    # decode, k + 1 to verify k drafted tokens. TensorRT's engines keep one (a shape input would need its profiles).
    keeps = kv is not None and kv.layout == "static" and o.logits == "last" and o.target != "trt"
    inputs = (*DECODER_INPUTS, *(kv.past_names if kv else ()), *((LOGITS_TO_KEEP,) if keeps else ()))
    graph = GraphSpec(task=o.task, target=o.target, logits=o.logits, inputs=inputs,
                      outputs=(first, *(kv.present_names if kv else ())))
    return ArtifactSpec(model=model, graph=graph, kv=kv, precision=_precision(dtype, text),
                        quant=_quant(o, gguf_source) if o.quant is not None else None,
                        trt=_trt(o, model, kv) if o.target == "trt" else None)


def _kv(o: ArtifactOptions, model: ModelSpec, dtype: str) -> KVSpec:
    static = o.kv_cache == "static"
    if o.sliding_cache is not None:
        _accept("sliding_cache", o.sliding_cache, SLIDING_CACHES)
        if not static:
            raise ValueError("--sliding-cache applies to the static KV layout (its buffers' slots); the dynamic "
                             "layout's past grows with the sequence: drop it or pass --kv-cache static")
    layers = model.kv_layers
    kv = KVSpec(layout=o.kv_cache, max_length=o.max_length if static else None, num_layers=len(layers),
                num_kv_heads=model.num_key_value_heads, head_dim=model.head_dim, dtype=dtype,
                sliding_window=model.sliding_window, sliding_window_layers=model.sliding_window_layers,
                layers=layers, shapes=tuple(model.kv_shapes[i] for i in layers))
    if not static:
        return kv
    full = dataclasses.replace(kv, slots=(o.max_length,) * len(layers))
    if not kv.sliding_window_layers:
        return full  # nothing slides
    window = window_slots(model.sliding_window)
    why_not = _no_window(o, model, dtype, window)
    if o.sliding_cache == "window" and why_not:
        raise ValueError(f"--sliding-cache window {why_not}; use --sliding-cache ring or full")
    if o.sliding_cache == "window" or (o.sliding_cache is None and not why_not):
        slots = tuple(window if i in kv.sliding_window_layers else o.max_length for i in layers)
        return dataclasses.replace(kv, sliding_cache="window", slots=slots)
    chunk = min(model.sliding_window, RING_CHUNK)
    ring = model.sliding_window + chunk
    if (o.sliding_cache or "ring") == "full" or ring >= o.max_length:  # asked for, or a ring no smaller
        return dataclasses.replace(full, sliding_cache="full")
    slots = tuple(ring if i in kv.sliding_window_layers else o.max_length for i in layers)
    return dataclasses.replace(kv, sliding_cache="ring", ring_chunk=chunk, slots=slots)


def _no_window(o: ArtifactOptions, model: ModelSpec, dtype: str, slots: int) -> str | None:
    """Why GroupQueryAttention's windowed cache cannot hold this export's sliding-window layers (None: it can)."""
    if o.target != "ort":
        return f"is GroupQueryAttention's cache: it needs --target ort, not {o.target}"
    if model.family not in WINDOW_FAMILIES:
        return f"is not for {model.family} (its KV-shared layers read another layer's cache with their own attention)"
    if dtype != "fp32":
        return f"is fused for float32 graphs, not {dtype}"
    if model.head_dim % 8:
        return f"needs a head_dim that is a multiple of 8 (GroupQueryAttention's CPU kernel), not {model.head_dim}"
    if slots >= o.max_length:
        return f"of {slots} slots is no smaller than --max-length {o.max_length}"
    return None


def _precision(dtype: str, text_generation: bool) -> PrecisionSpec:
    """float16 and bfloat16 graphs keep the residual stream (from the embedding's scale on), every norm, the
    rotation of q and k and the softmax in float32; bfloat16 also keeps q·k and the softmax's input, gelu(gate)·up
    and the post-norms' outputs there (what a GPU kernel's accumulator or epilogue holds in float32 anyway), and
    for text generation the tied embedding, which lm_head reads in float32 (bfloat16 logits near 20 are 0.125
    apart)."""
    wide = "fp32" if dtype != "fp32" else dtype
    bf16 = dtype == "bf16"
    return PrecisionSpec(dtype=dtype, residual=wide, scores=wide if bf16 else dtype,
                         activations=wide if bf16 else dtype, post_norms=wide if bf16 else dtype,
                         vocab_table=wide if bf16 and text_generation else dtype)


def _quant(o: ArtifactOptions, gguf_source: bool) -> QuantSpec:
    _accept("quant", o.quant, QUANTS)
    trt = o.target == "trt"
    method = o.quant_method or ("rtn" if trt else "gguf" if gguf_source else "gptq")
    symmetric = trt if o.symmetric is None else o.symmetric
    lm_head = o.lm_head or ("int4" if trt else "int8")
    _accept("quantization method", method, QUANT_METHODS)
    _accept("block size", o.block_size, BLOCK_SIZES)
    _accept("lm_head precision", lm_head, LM_HEAD)
    _accept("accuracy level", o.accuracy_level, ACCURACY_LEVELS)
    if trt:
        # TensorRT's blocked DequantizeLinear takes int4 weights without zero points, so neither HQQ's float zero
        # points nor asymmetric RTN map to it (TensorRT developer guide, "Quantized Types").
        if method != "rtn" or not symmetric:
            raise ValueError("the TensorRT graph takes symmetric round-to-nearest int4 only: "
                             "use --quant-method rtn --symmetric (the default for --target trt)")
        if lm_head == "int8":
            raise ValueError("the TensorRT graph quantizes lm_head to int4 or keeps it in float: "
                             "pass --lm-head int4 or --lm-head float")
    if method == "gptq" and symmetric:
        raise ValueError("gptq quantizes with zero points: drop --symmetric")
    if method == "gguf":
        given = [flag for flag, value in (("--int8-weights", o.int8_weights), ("--symmetric", o.symmetric)) if value]
        if given:
            raise ValueError(f"--quant-method gguf takes every layer's format from the GGUF: drop {', '.join(given)}")
    elif lm_head == "gguf":
        raise ValueError("--lm-head gguf goes with --quant-method gguf (the table as the GGUF holds it)")
    return QuantSpec(method=method, bits=4, block_size=o.block_size, symmetric=symmetric, lm_head=lm_head,
                     format="qdq" if trt else "matmulnbits", accuracy_level=o.accuracy_level,
                     int8_weights=tuple(o.int8_weights))


def _trt(o: ArtifactOptions, model: ModelSpec, kv: KVSpec | None) -> TrtSpec:
    max_length = o.max_length or min(model.max_position_embeddings, TRT_DEFAULT_CONTEXT)
    max_input_len = o.max_input_len or min(TRT_DEFAULT_INPUT_LEN, max_length)
    for name, value in (("max_batch_size", o.max_batch_size), ("max_input_len", max_input_len),
                        ("max_length", max_length)):
        if not _positive(value):
            raise ValueError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")
    if max_input_len > max_length:
        raise ValueError(f"--max-input-len {max_input_len} exceeds --max-length {max_length}: "
                         "a prompt must leave room in the context; lower it or raise --max-length")
    if o.optimization_level not in range(6):
        raise ValueError(f"--optimization-level {o.optimization_level} is out of range; TensorRT accepts 0..5 "
                         "(default 3)")
    if kv is not None and kv.layout == "static" and kv.max_length < max_length:
        raise ValueError(f"--max-length {max_length} exceeds the static KV cache of {kv.max_length} slots")
    return TrtSpec(BuildLimits(o.max_batch_size, max_input_len, max_length), o.optimization_level)


def _accept(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is not supported; supported: {', '.join(map(str, allowed))}")


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# -- reading sections back ------------------------------------------------------------------------------------


class SectionError(ValueError):
    """A section of a manifest does not have the fields or values its dataclass says (`where` names the field)."""


def load_section(cls, data, where: str):
    """`cls` (a dataclass of this module, or of the manifest's results) from its JSON form, checked field by
    field: types, nested sections, and the values of fields with `choices`. Keys the dataclass does not know
    are ignored (a newer exporter may write more)."""
    if not isinstance(data, dict):
        raise SectionError(f"{where} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name = f"{where}.{f.name}"
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SectionError(f"{name} is missing")
            continue
        value = _convert(hints[f.name], data[f.name], name)
        allowed = f.metadata.get("choices")
        if allowed is not None and value is not None and value not in allowed:
            raise SectionError(f"{name} {value!r} is not supported; supported: {', '.join(map(str, allowed))}")
        values[f.name] = value
    return cls(**values)


def _convert(kind, value, where: str):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(kind):
        return load_section(kind, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SectionError(f"{where} must be a list, got {value!r}")
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            raise SectionError(f"{where} must have {len(kinds)} entries, got {value!r}")
        return tuple(_convert(k, v, f"{where}[{i}]") for i, (k, v) in enumerate(zip(kinds, value)))
    if origin is list:
        if not isinstance(value, list):
            raise SectionError(f"{where} must be a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SectionError(f"{where} must be an object, got {value!r}")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if kind is typing.Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SectionError(f"{where} must be {kind.__name__}, got {value!r}")
    return value


def to_json(section) -> dict:
    """A section as manifest.json holds it (tuples as lists)."""
    return dataclasses.asdict(section)
