"""Graph fusions for ONNX Runtime (`--target ort`).

The driver applies onnxscript's `ort_fusions.optimize_for_ort` rules in their fixed order, then ours (one
a file), and returns the count of each that fired; the exporter prints the counts and records them in
the manifest. On our traces: every RMSNorm to SimplifiedLayerNormalization, the residual add before a
norm to SkipSimplifiedLayerNormalization, rotary to RotaryEmbedding with its cos/sin cache (models/gemma.py
writes rotary as transformers does so that onnxscript's rules match) computed for the positions fed only
(rotary_positions.py), tanh-gelu to FastGelu (fast_gelu.py), and in the static layout the attention block,
rotary included, to GroupQueryAttention with past and present sharing one buffer (group_query_attention.py).

After quantization (`pack_for_ort`), the projections that read one input become one MatMulNBits and a Split
(packed_matmul.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..graph_io import save_in_place

log = logging.getLogger(__name__)


def fuse_for_ort(path: Path, spec) -> dict[str, int]:
    """Rewrite the graph at `path` (and its model.onnx.data) in place for the artifact `spec`
    (runtime.spec.ArtifactSpec); returns {fusion: count} of those that fired."""
    import onnx_ir as ir
    import onnx_ir.passes.common  # noqa: F401
    from onnxscript.rewriter import ort_fusions

    from .fast_gelu import fast_gelu_rules
    from .group_query_attention import group_query_attention_rules
    from .rotary_positions import rotary_positions_rules

    model = ir.load(path)
    model, counts = ort_fusions.optimize_for_ort(model)
    counts["rotary_positions"] = rotary_positions_rules.apply_to_model(model)
    counts["fast_gelu"] = fast_gelu_rules.apply_to_model(model)
    # The rules above build the same small subgraphs once per layer (rotary tables, masks): keep one (the attention
    # rule finds q's and k's rotation on one table).
    ir.passes.common.CommonSubexpressionEliminationPass()(model)
    caches = layer_caches(spec)
    rotary, plain = group_query_attention_rules(caches, spec.kv.max_length if spec.kv else None)
    counts["group_query_attention_rotary"] = rotary.apply_to_model(model)
    counts["group_query_attention"] = plain.apply_to_model(model)
    ir.passes.common.CommonSubexpressionEliminationPass()(model)  # the rotary form's tables, once per RoPE
    ir.passes.common.RemoveUnusedNodesPass()(model)
    _check_windows(model, spec)
    fired = {name: count for name, count in counts.items() if count}
    save_in_place(model, path)
    log.info("fusions: %s", ", ".join(f"{k} {v}" for k, v in fired.items()) or "none")
    return fired


def pack_for_ort(path: Path) -> dict[str, int]:
    """After quantization: the MatMulNBits that read one input (q/k/v, gate/up) packed into one and a Split; the Add
    of a GGUF block's offsets (exporter/quantize.py) taken into the norm after it, as its skip input."""
    import onnx_ir as ir
    import onnx_ir.passes.common  # noqa: F401
    from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset

    from .packed_matmul import packed_attention_rules, packed_mlp_rules

    model = ir.load(path)
    counts = {"packed_attention": packed_attention_rules.apply_to_model(model),
              "packed_mlp": packed_mlp_rules.apply_to_model(model),
              "skip_rms_offsets": skip_rms_normalization_ruleset.apply_to_model(model)}
    ir.passes.common.RemoveUnusedNodesPass()(model)  # the weights that were packed
    fired = {name: count for name, count in counts.items() if count}
    save_in_place(model, path)
    log.info("packed: %s", ", ".join(f"{k} {v}" for k, v in fired.items()) or "none")
    return fired


def layer_caches(spec) -> dict:
    """{past key input name: LayerCache} of the static layout's layers (none in the dynamic layout)."""
    from .group_query_attention import LayerCache

    kv = spec.kv
    if kv is None or kv.layout != "static":
        return {}
    caches = {}
    for layer in kv.layers:
        sliding = layer in kv.sliding_window_layers
        caches[f"past_key_values.{layer}.key"] = LayerCache(kv.sliding_window if sliding else None,
                                                            layer in kv.window_layers)
    return caches


def _check_windows(model, spec) -> None:
    """A windowed cache is right only once GroupQueryAttention runs it: every such layer must have fused."""
    kv = spec.kv
    if kv is None or not kv.window_layers:
        return
    fused = {node.inputs[3].name for node in model.graph if node.op_type == "GroupQueryAttention"
             and node.attributes.get_int("sliding_window_cache", 0)}
    missing = [layer for layer in kv.window_layers if f"past_key_values.{layer}.key" not in fused]
    if missing:
        raise RuntimeError(f"--sliding-cache window: the attention of layers {missing} did not fuse into "
                           "GroupQueryAttention (run with -v for the reason); export with --sliding-cache ring")
