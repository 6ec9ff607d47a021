"""--target ort: the fusion driver's counts per family, and the fused graph's parity with PyTorch."""

from __future__ import annotations

import onnx
import pytest

from exporter import ExportOptions, export
from models import presets
from tests.families import ONE_PER_FAMILY


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_ort_target_fuses_every_norm_and_keeps_parity(tmp_path, name):
    config = presets.config(name)
    L = config.num_hidden_layers
    manifest = export(f"random:{name}", tmp_path / "a", ExportOptions(target="ort", progress=False))
    # Norms per layer: 2 (Gemma 1), 4 with sandwich norms, 6 with q/k norms; plus the final norm.
    per_layer = 2 + 2 * config.sandwich_norms + 2 * config.qk_norm
    assert manifest.fusions["rms_normalization"] == per_layer * L + 1
    # The residual add before each layer's second norm, before the next layer's first, and before the final norm.
    assert manifest.fusions["skip_rms_normalization"] == 2 * L
    assert manifest.fusions["rotary_embedding"] == 2 * L  # q and k of every layer
    assert manifest.fusions["cos_sin_cache"] == 2 * L
    assert manifest.fusions["fast_gelu"] == L
    assert manifest.fusions["rotary_positions"] == 2 * L  # tables of the fed positions only
    assert "group_query_attention" not in manifest.fusions  # the dynamic layout keeps its attention
    assert manifest.graph.target == "ort"
    assert manifest.parity.passed and manifest.parity.max_abs_diff <= 1e-4

    graph = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "ReduceMean" not in ops  # no RMSNorm left unfused
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * L
    assert ops.count("RotaryEmbedding") == 2 * L and ops.count("FastGelu") == L
    assert "Gelu" not in ops and "Neg" not in ops  # no tanh-gelu nor rotate_half left unfused
    assert ops.count("Cos") == len({config.rope(t) for t in config.layer_types})  # one table per RoPE, not per layer


@pytest.mark.parametrize("name", ["tiny-gemma2", pytest.param("tiny-gemma3", marks=pytest.mark.slow)])
def test_static_layout_attention_shares_its_buffers_and_decodes_as_the_unfused_graph(tmp_path, name):
    """GroupQueryAttention writes the static buffers in place (one buffer bound as past and present): a
    left-padded batch decoded past the sliding window gives the unfused graph's greedy tokens."""
    import numpy as np

    from runtime import load

    config = presets.config(name)
    fused = export(f"random:{name}", tmp_path / "fused",
                   ExportOptions(target="ort", kv_cache="static", max_length=48, progress=False))
    assert fused.kv.shares_buffers and fused.fusions["group_query_attention"] == config.num_hidden_layers
    assert fused.parity.passed and fused.parity.max_abs_diff <= 1e-4
    graph = onnx.load(str(tmp_path / "fused" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == config.num_hidden_layers and "Softmax" not in ops
    attrs = {a.name: onnx.helper.get_attribute_value(a)
             for a in next(n for n in graph.node if n.op_type == "GroupQueryAttention").attribute}
    assert attrs["softcap"] == pytest.approx(config.attn_logit_softcapping or 0.0)  # Gemma 2: 50; Gemma 3: none
    assert attrs["scale"] == pytest.approx(config.query_pre_attn_scalar**-0.5)
    assert (attrs["num_heads"], attrs["kv_num_heads"]) == (config.num_attention_heads, config.num_key_value_heads)
    assert attrs["local_window_size"] == -1  # the window is in the bias
    export(f"random:{name}", tmp_path / "plain", ExportOptions(progress=False, verify=False))
    ids = np.array([[0, 0, 0, 2, 17, 30, 41, 9], [2, 5, 77, 12, 8, 90, 33, 21]])  # pad 0, window 8
    mask = (np.arange(8) >= np.array([[3], [0]])).astype(np.int64)
    new = 3 * config.sliding_window
    tokens = {kind: load(tmp_path / kind).generate(ids, mask, max_new_tokens=new, eos_token_id=[])
              for kind in ("fused", "plain")}
    assert tokens["fused"].shape == (2, 8 + new)
    np.testing.assert_array_equal(tokens["fused"], tokens["plain"])
    assert len(set(tokens["fused"][0, 8:].tolist())) > 4  # random weights that do not repeat one token


def test_attention_the_kernel_cannot_run_is_left_unfused(tmp_path):
    """head_dim 12 is not a multiple of 8, which GroupQueryAttention's CPU kernel needs: the rule declines
    and the graph keeps its own attention, with parity."""
    import json

    values = presets.config("tiny-gemma3").to_dict() | {"head_dim": 12}
    (tmp_path / "config.json").write_text(json.dumps(values))
    manifest = export(f"random:{tmp_path / 'config.json'}", tmp_path / "a",
                      ExportOptions(target="ort", kv_cache="static", max_length=32, progress=False))
    assert "group_query_attention" not in manifest.fusions and manifest.fusions["rotary_embedding"]
    assert not manifest.kv.shares_buffers  # the unfused graph's runtime swaps two buffer sets
    assert manifest.parity.passed and manifest.parity.max_abs_diff <= 1e-4
    ops = [n.op_type for n in onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False).graph.node]
    assert "GroupQueryAttention" not in ops and "Softmax" in ops


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
