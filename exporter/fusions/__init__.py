"""Graph fusions for ONNX Runtime (`--target ort`).

This first driver applies onnxscript's `ort_fusions.optimize_for_ort` rules in their fixed order and
returns the count of each that fired; the exporter prints the counts and records them in the manifest.
On our traces they fuse every RMSNorm into SimplifiedLayerNormalization and the residual add before a
norm into SkipSimplifiedLayerNormalization. Rotary, tanh-gelu and attention (GroupQueryAttention) do
not match onnxscript's patterns: they need rules of our own, one a file (not done).
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

    model = ir.load(path)
    model, counts = ort_fusions.optimize_for_ort(model)
    fired = {name: count for name, count in counts.items() if count}
    save_in_place(model, path)
    log.info("fusions: %s", ", ".join(f"{k} {v}" for k, v in fired.items()) or "none")
    return fired
