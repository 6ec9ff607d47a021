"""--target ort: the fusion driver's counts per family, and the fused graph's parity with PyTorch."""

from __future__ import annotations

import onnx
import pytest

from exporter import ExportOptions, export
from models import presets

FAMILIES = ["tiny-gemma-2b", "tiny-gemma2", "tiny-gemma3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_ort_target_fuses_every_norm_and_keeps_parity(tmp_path, name):
    config = presets.config(name)
    L = config.num_hidden_layers
    manifest = export(f"random:{name}", tmp_path / "a", ExportOptions(target="ort", progress=False))
    # Norms per layer: 2 (Gemma 1), 4 with sandwich norms, 6 with q/k norms; plus the final norm.
    per_layer = 2 + 2 * config.sandwich_norms + 2 * config.qk_norm
    assert manifest["fusions"]["rms_normalization"] == per_layer * L + 1
    # The residual add before each layer's second norm, before the next layer's first, and before the final norm.
    assert manifest["fusions"]["skip_rms_normalization"] == 2 * L
    assert manifest["target"] == "ort"
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] <= 1e-4

    graph = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "ReduceMean" not in ops  # no RMSNorm left unfused
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * L
