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
    manifest = export(f"random:{name}", tmp_path / "a", ExportOptions(target="ort", kv_cache="dynamic", progress=False))
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


@pytest.mark.parametrize("name,sliding_cache", [("tiny-gemma2", "window"), ("tiny-gemma3", "full"),
                                                pytest.param("tiny-gemma3", "window", marks=pytest.mark.slow)])
def test_static_layout_attention_shares_its_buffers_and_decodes_as_the_unfused_graph(tmp_path, name, sliding_cache):
    """The whole attention block, rotary included, becomes GroupQueryAttention writing the static buffers in place
    (one buffer bound as past and present), each row at its own length, the window by local_window_size (and, with
    --sliding-cache window, on the kernel's windowed cache of 16 slots): a left-padded batch (taken apart into rows)
    decoded many windows long gives the unfused dynamic graph's greedy tokens."""
    import numpy as np

    from runtime import load

    config = presets.config(name)
    L, W = config.num_hidden_layers, config.sliding_window
    fused = export(f"random:{name}", tmp_path / "fused", ExportOptions(
        target="ort", kv_cache="static", max_length=96, sliding_cache=sliding_cache, progress=False))
    assert fused.fusions["group_query_attention_rotary"] == L and "group_query_attention" not in fused.fusions
    assert fused.kv.sliding_cache == sliding_cache and fused.parity.passed and fused.parity.max_abs_diff <= 1e-4
    graph = onnx.load(str(tmp_path / "fused" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == L
    assert not {"Softmax", "RotaryEmbedding", "TensorScatter", "Where"} & set(ops)  # no attention, rotary or mask left
    for layer, node in enumerate(n for n in graph.node if n.op_type == "GroupQueryAttention"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["softcap"] == pytest.approx(config.attn_logit_softcapping or 0.0)  # Gemma 2: 50; Gemma 3: none
        assert attrs["scale"] == pytest.approx(config.query_pre_attn_scalar**-0.5)
        assert (attrs["num_heads"], attrs["kv_num_heads"]) == (config.num_attention_heads, config.num_key_value_heads)
        sliding = config.layer_types[layer] == "sliding_attention"
        assert attrs["do_rotary"] == 1 and attrs["local_window_size"] == (W if sliding else -1)
        assert attrs.get("sliding_window_cache", 0) == int(sliding and sliding_cache == "window")
        assert node.input[16]  # query_seqlens: rows of several new tokens over a filled cache in one run
    export(f"random:{name}", tmp_path / "plain", ExportOptions(progress=False, verify=False))
    ids = np.array([[0, 0, 0, 2, 17, 30, 41, 9], [2, 5, 77, 12, 8, 90, 33, 21]])  # pad 0, window 8
    mask = (np.arange(8) >= np.array([[3], [0]])).astype(np.int64)
    new = 4 * 2 * W  # a windowed cache of 16 slots compacts every 9 tokens
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


@pytest.mark.parametrize("head_dim,window,fuses", [(32, 8, True), (12, 8, False), (32, 4, False)])
def test_group_query_attention_rule_on_a_one_layer_static_graph(tmp_path, head_dim, window, fuses):
    """One layer's static-layout attention block (q/k norms, rotary on the fed positions, TensorScatter, slice, masked
    softmax) becomes GroupQueryAttention, and ONNX Runtime gives the same logits and cache for rows of different
    lengths decoding together. Not fused: head_dim 12, which the kernel cannot run, and a layer whose window in the
    exporter's spec (4) is not the one its mask computes (8)."""
    import json

    import numpy as np
    import onnx_ir as ir
    import onnx_ir.passes.common  # noqa: F401
    import onnxruntime as ort
    from onnxscript.rewriter import ort_fusions

    from exporter.fusions.group_query_attention import LayerCache, group_query_attention_rules
    from exporter.fusions.rotary_positions import rotary_positions_rules
    from exporter.graph_io import save_copy

    values = presets.config("tiny-gemma3").to_dict() | {"num_hidden_layers": 1, "head_dim": head_dim}
    values["layer_types"] = ["sliding_attention"]  # the window of 8 masks the longer row's first slot
    (tmp_path / "config.json").write_text(json.dumps(values))
    export(f"random:{tmp_path / 'config.json'}", tmp_path / "a",
           ExportOptions(kv_cache="static", max_length=16, verify=False, progress=False))
    model = ir.load(tmp_path / "a" / "model.onnx")
    model, _ = ort_fusions.optimize_for_ort(model)
    rotary_positions_rules.apply_to_model(model)
    ir.passes.common.CommonSubexpressionEliminationPass()(model)
    unfused = save_copy(model, tmp_path / "unfused" / "model.onnx")
    rotary, _ = group_query_attention_rules({"past_key_values.0.key": LayerCache(window)}, max_positions=16)
    assert rotary.apply_to_model(model) == int(fuses)
    fused = save_copy(model, tmp_path / "fused" / "model.onnx")
    ops = [n.op_type for n in onnx.load(fused, load_external_data=False).graph.node]
    assert ("GroupQueryAttention" in ops) == fuses and ("RotaryEmbedding" in ops) != fuses

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


def _matmulnbits(name: str, x: str, weight, bits: int):
    """A MatMulNBits node on `x` with `weight` [K, N] as round-to-nearest blocks of 32, and its initializers."""
    from onnx import helper, numpy_helper

    from exporter.blocks import rtn

    blocks = rtn(weight, bits, 32, symmetric=False)
    inits = [numpy_helper.from_array(blocks.packed, f"{name}_Q{bits}"),
             numpy_helper.from_array(blocks.scales, f"{name}_scales"),
             numpy_helper.from_array(blocks.zero_points, f"{name}_zero_points")]
    node = helper.make_node("MatMulNBits", [x, *(i.name for i in inits)], [name], domain="com.microsoft",
                            K=weight.shape[0], N=weight.shape[1], bits=bits, block_size=32, accuracy_level=4)
    return node, inits


def _run_both(proto, feeds, rules):
    """(outputs before, outputs after, op types after, rewrites) of applying `rules` to the ONNX `proto`."""
    import onnx_ir as ir
    import onnxruntime as ort

    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    model = ir.serde.deserialize_model(proto)
    count = rules.apply_to_model(model)
    after = ir.serde.serialize_model(model)
    return run(proto), run(after), [n.op_type for n in after.graph.node], count


@pytest.mark.parametrize("v_bits,fuses", [(4, True), (8, False)])
def test_packed_attention_rule_packs_q_k_v_alike_and_keeps_the_outputs(v_bits, fuses):
    """q, k, v projections (q and k through their per-head norms) into GroupQueryAttention become one MatMulNBits,
    one norm over q's and k's heads and the kernel's packed input; a v quantized to other bits stays apart."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from exporter.fusions.packed_matmul import packed_attention_rules

    rng = np.random.default_rng(0)
    K, H, Hkv, D, L = 64, 4, 2, 16, 8
    nodes, inits = [], []
    for name, heads, bits in (("q", H, 4), ("k", Hkv, 4), ("v", Hkv, v_bits)):
        node, weights = _matmulnbits(name, "x", rng.standard_normal((K, heads * D)).astype(np.float32), bits)
        nodes.append(node)
        inits += weights
    for name, heads in (("q", H), ("k", Hkv)):
        inits += [numpy_helper.from_array(np.array([0, 0, heads, D], np.int64), f"{name}_heads"),
                  numpy_helper.from_array(np.array([0, 0, heads * D], np.int64), f"{name}_flat"),
                  numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), f"{name}_gamma")]
        nodes += [helper.make_node("Reshape", [name, f"{name}_heads"], [f"{name}4"]),
                  helper.make_node("SimplifiedLayerNormalization", [f"{name}4", f"{name}_gamma"], [f"{name}n"],
                                   axis=-1, epsilon=1e-6),
                  helper.make_node("Reshape", [f"{name}n", f"{name}_flat"], [f"{name}3"])]
    nodes.append(helper.make_node("GroupQueryAttention", ["q3", "k3", "v", "past_k", "past_v", "seqlens_k", "total"],
                                  ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=H,
                                  kv_num_heads=Hkv, scale=0.25))
    cache = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, Hkv, L, D])  # noqa: E731
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, K]), cache("past_k"), cache("past_v"),
                     helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                     helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out", "present_k", "present_v")], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    past = rng.standard_normal((1, Hkv, L, D)).astype(np.float32)
    feeds = {"x": rng.standard_normal((1, 3, K)).astype(np.float32), "past_k": past, "past_v": past[..., ::-1].copy(),
             "seqlens_k": np.array([5], np.int32), "total": np.array(6, np.int32)}
    before, after, ops, count = _run_both(proto, feeds, packed_attention_rules)
    assert count == int(fuses)
    assert ops.count("MatMulNBits") == (1 if fuses else 3) and ops.count("SimplifiedLayerNormalization") == (1 if fuses else 2)
    for a, b in zip(before, after):
        np.testing.assert_allclose(b, a, atol=1e-4)


@pytest.mark.parametrize("up_bits,fuses", [(4, True), (8, False)])
def test_packed_mlp_rule_packs_gate_and_up_alike_and_keeps_the_outputs(up_bits, fuses):
    """FastGelu(x W_gate) * (x W_up) becomes one MatMulNBits and a Split; an up quantized to other bits stays apart."""
    import numpy as np
    from onnx import TensorProto, helper

    from exporter.fusions.packed_matmul import packed_mlp_rules

    rng = np.random.default_rng(0)
    K, N = 64, 96
    gate, gate_inits = _matmulnbits("gate", "x", rng.standard_normal((K, N)).astype(np.float32), 4)
    up, up_inits = _matmulnbits("up", "x", rng.standard_normal((K, N)).astype(np.float32), up_bits)
    nodes = [gate, up, helper.make_node("FastGelu", ["gate"], ["gelu"], domain="com.microsoft"),
             helper.make_node("Mul", ["gelu", "up"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], gate_inits + up_inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    before, after, ops, count = _run_both(proto, {"x": rng.standard_normal((2, 3, K)).astype(np.float32)},
                                          packed_mlp_rules)
    assert count == int(fuses) and ops.count("MatMulNBits") == (1 if fuses else 2) and ("Split" in ops) == fuses
    np.testing.assert_allclose(after[0], before[0], atol=1e-4)
