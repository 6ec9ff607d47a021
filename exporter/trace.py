"""Trace a models/ Gemma into one ONNX graph that serves prefill and decode.

Graph I/O (docs/design.md, 'Graph I/O': the names optimum and onnxruntime-genai use):

    input_ids [B, S] int64 ─┐
    attention_mask [B, T]  ─┼─> decoder ──> logits [B, S or 1 or K, V] float32
    position_ids [B, S]    ─┤            └> present.{i}.key/value [B, Hkv, T or L, D]
    past_key_values.{i}.key/value [B, Hkv, P or L, D]
    num_logits_to_keep [] int64 (static layout, --logits last: K trailing positions)

T = P + S; with the static layout P and T are replaced by each layer's slots (buffers updated in place):
L = max_length, or the ring's R for a sliding-window layer (manifest kv.sliding_cache "ring").
Before tracing, every Linear is rewritten to hold its weight as [in, out] and the tied embedding as
[hidden, vocab], one tensor at a time: the graph gets MatMul(x, W) on initializers (the form ONNX
Runtime's quantizers and fusions expect) with no Transpose for the optimizer to fold into a copy, and
peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from models.attention import TENSOR_SCATTER_OPSET
from models.gemma import GemmaForCausalLM, decoder_of
from models.gemma4 import Experts, experts_forward
from runtime.spec import ELEMENT_TYPE, LOGITS_TO_KEEP, ArtifactSpec

log = logging.getLogger(__name__)

class MatMulLinear(nn.Module):
    """y = x @ W + b with W stored [in, out]: a MatMul on an initializer once traced."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight)
        return y if self.bias is None else y + self.bias


class MatMulExperts(nn.Module):
    """Gemma 4's experts with their weights stored [E, in, out]: batched MatMuls on named initializers (the
    transposes of [E, out, in] would be folded by the optimizer into a second, anonymous copy)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach().transpose(1, 2).contiguous(), requires_grad=False)
        self.down_proj = nn.Parameter(experts.down_proj.detach().transpose(1, 2).contiguous(), requires_grad=False)
        self.act_dtype = experts.act_dtype

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(x, weights, self.gate_up_proj, self.down_proj, self.act_dtype)


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
    norm's float32 output: the spec's precision.vocab_table, runtime/spec.py _precision)."""

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
    for parent in [m for m in model.modules() if isinstance(getattr(m, "experts", None), Experts)]:
        parent.experts = MatMulExperts(parent.experts)
    decoder.embed_tokens = TransposedEmbedding(decoder.embed_tokens.weight)
    if tied:
        model.lm_head = TiedLogits(decoder.embed_tokens)


class GraphModule(nn.Module):
    """Flat positional I/O around the model, in the order of the spec's graph names."""

    def __init__(self, model: nn.Module, spec: ArtifactSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, input_ids, attention_mask, position_ids, *rest):
        spec = self.spec
        if spec.kv is not None:
            past_flat, keep = (rest[:-1], rest[-1]) if spec.graph.keeps_logits else (rest, int(spec.graph.logits == "last"))
            past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(spec.kv.num_layers)]
            logits, present = self.model(input_ids, position_ids, attention_mask, past, logits_to_keep=keep)
            return (logits, *[t for kv in present for t in kv])
        m, dtype = spec.model, decoder_of(self.model).precision.dtype
        empty = [input_ids.new_zeros((input_ids.shape[0], m.kv_shapes[i][0], 0, m.kv_shapes[i][1]), dtype=dtype)
                 for i in m.kv_layers]
        out, _ = self.model(input_ids, position_ids, attention_mask, [(e, e) for e in empty])  # no past: rest is ()
        return (out,)


def sample_inputs(spec: ArtifactSpec) -> tuple[torch.Tensor, ...]:
    """Distinct sizes for every dynamic dimension (B=2, S=3, P=5) so that none is specialized."""
    B, S, P = 2, 3, 5
    ids = torch.randint(3, spec.model.vocab_size, (B, S))
    kv = spec.kv
    if kv is None:
        mask = torch.ones(B, S, dtype=torch.long)
        return ids, mask, mask.cumsum(-1) - 1
    mask = torch.ones(B, P + S, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1)[:, -S:]
    dtype = getattr(torch, ELEMENT_TYPE[kv.dtype])
    past = [torch.zeros((B, heads, P if slots is None else slots, head_dim), dtype=dtype)
            for heads, slots, head_dim in kv.shapes_by_name.values()]
    keep = (torch.tensor(2),) if spec.graph.keeps_logits else ()  # 1 < 2 < S: neither end specialized
    return (ids, mask, positions, *past, *keep)


def dynamic_shapes(spec: ArtifactSpec) -> dict:
    batch = torch.export.Dim("batch_size")
    seq = torch.export.Dim("sequence_length")
    shapes = {
        "input_ids": {0: batch, 1: seq},
        # T = P + S is derived by torch.export from the concatenation; named after export.
        "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
        "position_ids": {0: batch, 1: seq},
    }
    kv = spec.kv
    if kv is not None:
        past_dims = {0: batch} if kv.layout == "static" else {0: batch, 2: torch.export.Dim("past_sequence_length")}
        shapes["rest"] = (*(dict(past_dims) for _ in kv.past_names), *((None,) if spec.graph.keeps_logits else ()))
    return shapes


def trace(model: nn.Module, spec: ArtifactSpec, path: Path) -> Path:
    """Export the model (built in the spec's precision and KV layout) to `path` (model.onnx, weights in
    model.onnx.data); returns the path."""
    import onnx

    to_export_form(model)
    graph = GraphModule(model, spec).eval()
    inputs = sample_inputs(spec)
    layout = spec.kv.layout if spec.kv else "no"
    log.info("tracing %s (%d layers, %s KV cache) with torch.onnx", spec.model.family, spec.model.num_hidden_layers,
             layout)
    static = spec.kv is not None and spec.kv.layout == "static"
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            graph,
            inputs,
            input_names=list(spec.graph.inputs),
            output_names=list(spec.graph.outputs),
            dynamic_shapes=dynamic_shapes(spec),
            opset_version=TENSOR_SCATTER_OPSET if static else None,  # the static layout writes with TensorScatter
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


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's own notices, which say nothing about the artifact: that dynamic dimensions sharing a constraint
    keep one name (_name_dims names them all after), a pytree deprecation inside torch, and that torchvision's
    operators are not registered (no model here uses them). Other warnings pass."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _name_dims(ir_model, spec: ArtifactSpec) -> None:
    """Give every graph input and output the names of its dynamic dimensions (docs/design.md, 'Graph I/O')."""
    import onnx_ir as ir

    kv = spec.kv
    slots = dict(zip(kv.present_names, kv.slots_by_name.values())) | kv.slots_by_name if kv else {}
    for value in [*ir_model.graph.inputs, *ir_model.graph.outputs]:
        if value.shape is None:
            continue
        dims = list(value.shape)
        name = value.name
        if name == "attention_mask":
            dims[1] = "total_sequence_length"
        elif name.startswith("present."):
            dims[2] = slots[name] or "total_sequence_length"
        elif name.startswith("past_key_values."):
            dims[2] = slots[name] or "past_sequence_length"
        elif name in ("logits", "last_hidden_state") and spec.graph.logits == "last" and kv is not None:
            dims[1] = LOGITS_TO_KEEP if spec.graph.keeps_logits else 1
        value.shape = ir.Shape(dims)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the weights, the tied embedding counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total

