"""Trace a models/ Gemma into one ONNX graph that serves prefill and decode.

Graph I/O (DESIGN.md, the names optimum and onnxruntime-genai use):

    input_ids [B, S] int64 ─┐
    attention_mask [B, T]  ─┼─> decoder ──> logits [B, S or 1, V] float32
    position_ids [B, S]    ─┤            └> present.{i}.key/value [B, Hkv, T or L, D]
    past_key_values.{i}.key/value [B, Hkv, P or L, D]

T = P + S; with the static layout P and T are replaced by L = max_length (buffers updated in place).
Before tracing, every Linear is rewritten to hold its weight as [in, out] and the tied embedding as
[hidden, vocab], one tensor at a time: the graph gets MatMul(x, W) on initializers (the form ONNX
Runtime's quantizers and fusions expect) with no Transpose for the optimizer to fold into a copy, and
peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.config import GemmaConfig
from models.gemma import GemmaForCausalLM, compute_dtype, decoder_of, use_static_cache
from runtime.manifest import DECODER_INPUTS, kv_names  # the graph names are the artifact contract

log = logging.getLogger(__name__)

DIM_NAMES = ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")


@dataclass(frozen=True)
class GraphSpec:
    """What the traced graph takes and gives; recorded in the manifest."""

    task: str
    num_layers: int
    kv_layout: str  # dynamic | static
    max_length: int | None
    logits: str  # all | last

    @property
    def with_past(self) -> bool:
        return self.task == "text-generation"

    @property
    def past_names(self) -> list[str]:
        if not self.with_past:
            return []
        return kv_names("past_key_values", self.num_layers)

    @property
    def present_names(self) -> list[str]:
        if not self.with_past:
            return []
        return kv_names("present", self.num_layers)

    @property
    def input_names(self) -> list[str]:
        return [*DECODER_INPUTS, *self.past_names]

    @property
    def output_names(self) -> list[str]:
        first = "last_hidden_state" if self.task == "feature-extraction" else "logits"
        return [first, *self.present_names]


class MatMulLinear(nn.Module):
    """y = x @ W + b with W stored [in, out]: a MatMul on an initializer once traced."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight)
        return y if self.bias is None else y + self.bias


class TransposedEmbedding(nn.Module):
    """The tied embedding stored once as [hidden, vocab]; the lookup is a Gather on axis 1, exact and
    cheap for the few tokens of a step."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight_t = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)  # [H, V]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # index_select traces to Gather(axis=1); advanced indexing would trace to Transpose(E) + GatherND,
        # which ONNX Runtime folds into a second, transposed copy of the whole embedding.
        rows = torch.index_select(self.weight_t, 1, ids.reshape(-1))  # [H, B*S]
        return rows.t().reshape(*ids.shape, -1)  # [B, S, H]


class TiedLogits(nn.Module):
    """lm_head as MatMul(x, E^T) on the embedding's own parameter (float32 in bfloat16 graphs, with the final
    norm's float32 output: exporter.api.float32_vocab_tables)."""

    def __init__(self, embedding: TransposedEmbedding):
        super().__init__()
        self.weight_t = embedding.weight_t  # shared, not copied

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.matmul(hidden, self.weight_t)  # [B, S, V]


def to_export_form(model: nn.Module) -> None:
    """Rewrite Linears and the tied embedding in place, freeing each original as it goes."""
    decoder = decoder_of(model)
    tied = isinstance(model, GemmaForCausalLM) and model.lm_head.weight is decoder.embed_tokens.weight
    # (parent, name) pairs only: a list holding the Linears themselves would keep every original alive.
    slots = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and not (tied and parent is model and name == "lm_head")
    ]
    for parent, name in slots:
        setattr(parent, name, MatMulLinear(getattr(parent, name)))
    decoder.embed_tokens = TransposedEmbedding(decoder.embed_tokens.weight)
    if tied:
        model.lm_head = TiedLogits(decoder.embed_tokens)


class GraphModule(nn.Module):
    """Flat positional I/O around the model, in the order of GraphSpec's names."""

    def __init__(self, model: nn.Module, spec: GraphSpec):
        super().__init__()
        self.model = model
        self.spec = spec
        self.config: GemmaConfig = model.config

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        if self.spec.with_past:
            past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.spec.num_layers)]
            logits, present = self.model(
                input_ids, position_ids, attention_mask, past, last_logits_only=self.spec.logits == "last"
            )
            return (logits, *[t for kv in present for t in kv])
        c = self.config
        empty = input_ids.new_zeros((input_ids.shape[0], c.num_key_value_heads, 0, c.head_dim),
                                    dtype=compute_dtype(self.model))
        past = [(empty, empty)] * c.num_hidden_layers
        out, _ = self.model(input_ids, position_ids, attention_mask, past)
        return (out,)


def sample_inputs(config: GemmaConfig, spec: GraphSpec, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Distinct sizes for every dynamic dimension (B=2, S=3, P=5) so that none is specialized."""
    B, S, P = 2, 3, 5
    ids = torch.randint(3, config.vocab_size, (B, S))
    if not spec.with_past:
        mask = torch.ones(B, S, dtype=torch.long)
        return ids, mask, mask.cumsum(-1) - 1
    mask = torch.ones(B, P + S, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1)[:, -S:]
    length = spec.max_length if spec.kv_layout == "static" else P
    shape = (B, config.num_key_value_heads, length, config.head_dim)
    past = [torch.zeros(shape, dtype=dtype) for _ in spec.past_names]
    return (ids, mask, positions, *past)


def dynamic_shapes(spec: GraphSpec) -> dict:
    batch = torch.export.Dim("batch_size")
    seq = torch.export.Dim("sequence_length")
    shapes = {
        "input_ids": {0: batch, 1: seq},
        # T = P + S is derived by torch.export from the concatenation; named after export.
        "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
        "position_ids": {0: batch, 1: seq},
    }
    if spec.with_past:
        past_dims = {0: batch} if spec.kv_layout == "static" else {0: batch, 2: torch.export.Dim("past_sequence_length")}
        shapes["past_flat"] = tuple(dict(past_dims) for _ in spec.past_names)
    return shapes


def trace(model: nn.Module, spec: GraphSpec, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Export the model to `path` (model.onnx, weights in model.onnx.data); returns the path."""
    import onnx

    config = model.config
    use_static_cache(model, spec.kv_layout == "static")
    to_export_form(model)
    graph = GraphModule(model, spec).eval()
    inputs = sample_inputs(config, spec, dtype)
    log.info("tracing %s (%d layers, %s KV cache) with torch.onnx", config.model_type, spec.num_layers, spec.kv_layout)
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            inputs,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes(spec),
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    _name_dims(program.model, spec)
    log.info("saving %s", path)
    program.save(path, external_data=True)
    del program
    onnx.checker.check_model(str(path))  # by path: works for graphs over 2 GB
    return path


def _name_dims(ir_model, spec: GraphSpec) -> None:
    """Give every graph input and output the DESIGN.md names of its dynamic dimensions."""
    import onnx_ir as ir

    total = "total_sequence_length"
    kv_len = "past_sequence_length"
    for value in [*ir_model.graph.inputs, *ir_model.graph.outputs]:
        if value.shape is None:
            continue
        dims = list(value.shape)
        name = value.name
        if name == "attention_mask":
            dims[1] = total
        elif name.startswith("present."):
            dims[2] = spec.max_length if spec.kv_layout == "static" else total
        elif name.startswith("past_key_values."):
            dims[2] = spec.max_length if spec.kv_layout == "static" else kv_len
        elif name in ("logits", "last_hidden_state") and spec.logits == "last" and spec.with_past:
            dims[1] = 1
        value.shape = ir.Shape(dims)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the weights, the tied embedding counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total

