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
    assert manifest["fusions"]["rotary_embedding"] == 2 * L  # q and k of every layer
    assert manifest["fusions"]["cos_sin_cache"] == 2 * L
    assert manifest["fusions"]["fast_gelu"] == L
    assert manifest["target"] == "ort"
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] <= 1e-4

    graph = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "ReduceMean" not in ops  # no RMSNorm left unfused
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * L
    assert ops.count("RotaryEmbedding") == 2 * L and ops.count("FastGelu") == L
    assert "Gelu" not in ops and "Neg" not in ops  # no tanh-gelu nor rotate_half left unfused


@pytest.mark.parametrize("approximate,fuses", [("tanh", True), ("none", False)])
def test_fast_gelu_rule_fuses_tanh_gelu_only_and_keeps_the_outputs(approximate, fuses):
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from exporter.fusions.fast_gelu import fast_gelu_rules

    graph = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    x = np.linspace(-4, 4, 16, dtype=np.float32).reshape(2, 8)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    before = run(proto)
    model = ir.serde.deserialize_model(proto)
    assert fast_gelu_rules.apply_to_model(model) == int(fuses)
    after_proto = ir.serde.serialize_model(model)
    assert [n.op_type for n in after_proto.graph.node] == (["FastGelu"] if fuses else ["Gelu"])
    np.testing.assert_allclose(run(after_proto), before, atol=1e-5)
