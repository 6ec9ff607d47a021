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
    """GroupQueryAttention writes the static buffers in place (one buffer bound as past and present), each row at
    its own length: a left-padded batch (taken apart into rows) decoded past the sliding window gives the
    unfused dynamic graph's greedy tokens."""
    import numpy as np

    from runtime import load

    config = presets.config(name)
    fused = export(f"random:{name}", tmp_path / "fused",  # full: the ring's layers keep their own attention
                   ExportOptions(target="ort", kv_cache="static", max_length=48, sliding_cache="full", progress=False))
    assert fused.fusions["group_query_attention"] == config.num_hidden_layers
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


def _rotary_graph(start: int):
    """RotaryEmbedding with onnxscript's cos/sin cache: tables for positions start..max(position_ids)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    B, H, S, D = 2, 2, 3, 8
    inv_freq = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)[None]  # [1, D/2]
    inits = [numpy_helper.from_array(inv_freq, "inv_freq"), numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array(start, np.int64), "start"),
             numpy_helper.from_array(np.array([-1, 1], np.int64), "column")]
    nodes = [
        helper.make_node("ReduceMax", ["position_ids"], ["max"], keepdims=0),
        helper.make_node("Add", ["max", "one"], ["end"]),
        helper.make_node("Range", ["start", "end", "one"], ["range"]),
        helper.make_node("Reshape", ["range", "column"], ["rows"]),
        helper.make_node("Cast", ["rows"], ["rows_f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["rows_f", "inv_freq"], ["freqs"]),
        helper.make_node("Cos", ["freqs"], ["cos"]),
        helper.make_node("Sin", ["freqs"], ["sin"]),
        helper.make_node("RotaryEmbedding", ["x", "position_ids", "cos", "sin"], ["y"], domain="com.microsoft"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, H, S, D]),
                                           helper.make_tensor_value_info("position_ids", TensorProto.INT64, [B, S])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, H, S, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    x = np.random.default_rng(0).standard_normal((B, H, S, D)).astype(np.float32)
    return model, {"x": x, "position_ids": np.array([[4, 5, 6], [0, 1, 2]], np.int64)}


@pytest.mark.parametrize("start,fuses", [(0, True), (1, False)])
def test_rotary_positions_rule_computes_the_fed_positions_only(start, fuses):
    """Tables from position 0 are rebuilt for the fed positions only (outputs unchanged); a table that starts
    elsewhere is not the pattern (its row index is not the position)."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort

    from exporter.fusions.rotary_positions import rotary_positions_rules

    proto, feeds = _rotary_graph(start)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]  # noqa: E731
    before = run(proto) if fuses else None
    model = ir.serde.deserialize_model(proto)
    assert rotary_positions_rules.apply_to_model(model) == int(fuses)
    after = ir.serde.serialize_model(model)
    ops = [n.op_type for n in after.graph.node]
    assert ("ReduceMax" in ops) != fuses and ops.count("RotaryEmbedding") == 1
    if fuses:
        np.testing.assert_allclose(run(after), before, atol=1e-6)


@pytest.mark.parametrize("head_dim,fuses", [(32, True), (12, False)])
def test_group_query_attention_rule_on_a_one_layer_static_graph(tmp_path, head_dim, fuses):
    """One layer's static-layout attention (TensorScatter, slice, masked softmax) becomes GroupQueryAttention, and
    ONNX Runtime gives the same logits and cache for rows of different lengths decoding together; head_dim 12,
    which the kernel cannot run, stays unfused."""
    import json

    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort
    from onnxscript.rewriter import ort_fusions

    from exporter.fusions.group_query_attention import group_query_attention_rules

    values = presets.config("tiny-gemma2").to_dict() | {"num_hidden_layers": 1, "head_dim": head_dim}
    values["layer_types"] = ["sliding_attention"]  # the window of 8 masks the longer row's first slot
    (tmp_path / "config.json").write_text(json.dumps(values))
    export(f"random:{tmp_path / 'config.json'}", tmp_path / "a",
           ExportOptions(kv_cache="static", max_length=16, verify=False, progress=False))
    from exporter.graph_io import save_copy

    model = ir.load(tmp_path / "a" / "model.onnx")
    model, _ = ort_fusions.optimize_for_ort(model)
    unfused = save_copy(model, tmp_path / "unfused" / "model.onnx")
    assert group_query_attention_rules.apply_to_model(model) == int(fuses)
    fused = save_copy(model, tmp_path / "fused" / "model.onnx")
    assert ("GroupQueryAttention" in [n.op_type for n in onnx.load(fused, load_external_data=False).graph.node]) == fuses

    rng = np.random.default_rng(0)
    lengths = np.array([5, 9])  # each row's slots after this step: one new token after 4 and 8
    cache = rng.standard_normal((2, values["num_key_value_heads"], 16, head_dim)).astype(np.float32)
    feeds = {"input_ids": np.array([[7], [9]]), "position_ids": (lengths - 1)[:, None],
             "attention_mask": (np.arange(9)[None] < lengths[:, None]).astype(np.int64),
             "past_key_values.0.key": cache, "past_key_values.0.value": cache[:, :, ::-1].copy()}
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    (logits, *expected), (fused_logits, *got) = run(unfused), run(fused)
    np.testing.assert_allclose(fused_logits, logits, atol=1e-5)
    for a, b in zip(expected, got):  # each row's slots in use (an unshared present keeps nothing past them)
        for row, n in enumerate(lengths):
            np.testing.assert_allclose(b[row, :, :n], a[row, :, :n], atol=1e-5)
