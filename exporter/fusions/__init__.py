"""Graph fusions for ONNX Runtime (`--target ort`).

The driver applies onnxscript's `ort_fusions.optimize_for_ort` rules in their fixed order, then ours (one
a file), and returns the count of each that fired; the exporter prints the counts and records them in
the manifest. On our traces: every RMSNorm to SimplifiedLayerNormalization, the residual add before a
norm to SkipSimplifiedLayerNormalization, rotary to RotaryEmbedding with its cos/sin cache (models/gemma.py
writes rotary as transformers does so that onnxscript's rules match) computed for the positions fed only
(rotary_positions.py), tanh-gelu to FastGelu
(fast_gelu.py), and attention to GroupQueryAttention with the mask as its attention_bias and, in the
static layout, past and present sharing one buffer (group_query_attention.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..graph_io import save_in_place

log = logging.getLogger(__name__)


def fuse_for_ort(path: Path) -> dict[str, int]:
    """Rewrite the graph at `path` (and its model.onnx.data) in place; returns {fusion: count} of those that fired."""
    import onnx_ir as ir
    from onnxscript.rewriter import ort_fusions

    from .fast_gelu import fast_gelu_rules
    from .group_query_attention import group_query_attention_rules
    from .rotary_positions import rotary_positions_rules

    model = ir.load(path)
    model, counts = ort_fusions.optimize_for_ort(model)
    counts["rotary_positions"] = rotary_positions_rules.apply_to_model(model)
    counts["fast_gelu"] = fast_gelu_rules.apply_to_model(model)
    counts["group_query_attention"] = group_query_attention_rules.apply_to_model(model)
    # The rules above build the same small subgraphs once per layer (rotary tables, masks): keep one.
    ir.passes.common.CommonSubexpressionEliminationPass()(model)
    fired = {name: count for name, count in counts.items() if count}
    save_in_place(model, path)
    log.info("fusions: %s", ", ".join(f"{k} {v}" for k, v in fired.items()) or "none")
    return fired
