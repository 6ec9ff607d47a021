"""--quant int4 and --dtype fp16/bf16: the quantizers against ONNX Runtime's kernels, the rewritten graphs
against a PyTorch reference holding the same (dequantized) weights, and the TensorRT-flavoured graph."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from exporter import ExportOptions, export
from exporter.bf16_emulation import emulate_bfloat16
from exporter.blocks import hqq, rtn
from exporter.cli import export_command
from models import presets
from tests.families import ONE_PER_FAMILY

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def _assert_topological(graph):
    """Every node reads only inputs, initializers and earlier nodes' outputs, as TensorRT's parser needs."""
    defined = {v.name for v in [*graph.input, *graph.initializer]} | {""}
    for node in graph.node:
        assert set(node.input) <= defined, f"{node.name} reads {set(node.input) - defined} before it is computed"
        defined.update(node.output)


def _run(nodes, inputs, feeds, initializers, opset=21):
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes if n.output[0] != "_"]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, False)])
def test_rtn_blocks_decode_as_matmulnbits_and_gatherblockquantized_do(bits, symmetric):
    """Our dequantization equals ONNX Runtime's on both operators sharing one packed tensor (the tied
    lm_head/embedding), with a hidden size that is not a whole number of blocks."""
    rng = np.random.default_rng(0)
    K, N, block = 80, 24, 32
    weight = rng.standard_normal((K, N)).astype(np.float32)
    blocks = rtn(weight, bits, block, symmetric)
    dequantized = blocks.dequantize()
    assert dequantized.shape == (K, N)
    assert 0 < np.abs(dequantized - weight).max() < (0.5 if bits == 4 else 0.05)  # quantized, and close

    inits = [numpy_helper.from_array(blocks.packed, "B"), numpy_helper.from_array(blocks.scales.astype(np.float32), "S"),
             numpy_helper.from_array(np.array([N, -1], np.int64), "rows")]
    zp = [] if blocks.zero_points is None else ["Z"]
    if zp:
        inits.append(numpy_helper.from_array(blocks.zero_points, "Z"))
    nodes = [
        helper.make_node("MatMulNBits", ["x", "B", "S", *zp], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                         block_size=block),
        helper.make_node("Reshape", ["B", "rows"], ["_"]),
        helper.make_node("GatherBlockQuantized", ["_", "ids", "S", *zp], ["e"], domain="com.microsoft", bits=bits,
                         block_size=block, gather_axis=0, quantize_axis=1),
    ]
    x = rng.standard_normal((3, K)).astype(np.float32)
    ids = np.array([0, 5, N - 1])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, [3])]
    y, e = _run(nodes, inputs, {"x": x, "ids": ids}, inits)
    np.testing.assert_allclose(y, x @ dequantized, atol=1e-4)
    np.testing.assert_allclose(e[:, :K], dequantized[:, ids].T, atol=1e-6)


def test_hqq_is_closer_than_rtn_and_decodes_as_matmulnbits():
    rng = np.random.default_rng(1)
    K, N, block = 128, 64, 32
    weight = (rng.standard_normal((K, N)) * rng.uniform(0.5, 2, (1, N))).astype(np.float32)
    ours = hqq(weight, block)
    baseline = rtn(weight, 4, block, symmetric=False)
    assert ours.zero_points.dtype == np.float32  # HQQ's zero points are floats
    error = lambda b: float(np.abs(b.dequantize() - weight).mean())  # noqa: E731
    assert error(ours) < error(baseline)
    nodes = [helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                              block_size=block)]
    inits = [numpy_helper.from_array(ours.packed, "B"), numpy_helper.from_array(ours.scales, "S"),
             numpy_helper.from_array(ours.zero_points, "Z")]
    x = rng.standard_normal((2, K)).astype(np.float32)
    (y,) = _run(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])], {"x": x}, inits)
    np.testing.assert_allclose(y, x @ ours.dequantize(), atol=1e-4)


def test_qdq_layout_equals_the_blocks():
    """The TensorRT form: int4 [K, N] with scales [K/bs, N] through a blocked DequantizeLinear."""
    weight = np.random.default_rng(2).standard_normal((64, 16)).astype(np.float32)
    blocks = rtn(weight, 4, 32, symmetric=True)
    q, scales = blocks.int4_kn()
    assert q.min() >= -8 and q.max() <= 7 and scales.shape == (2, 16)
    tensor = helper.make_tensor("q", TensorProto.INT4, q.shape, q.flatten().tolist())
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0, block_size=32)]
    (w,) = _run(nodes, [], {}, [tensor, numpy_helper.from_array(scales, "s")])
    np.testing.assert_allclose(w, blocks.dequantize(), atol=1e-6)


def test_bfloat16_emulation_rounds_where_the_graph_stores(tmp_path):
    """An Add in bfloat16: the emulated graph gives bf16(bf16(a) + bf16(b)) carried in float32."""
    nodes = [helper.make_node("Add", ["a", "w"], ["y"])]
    w = np.array([1.0, 2.0, 3.0], dtype=ml_dtypes.bfloat16)
    init = helper.make_tensor("w", TensorProto.BFLOAT16, [3], w.astype(np.float32).tolist())
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.BFLOAT16, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [3])], [init])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "bf16.onnx")
    path = emulate_bfloat16(tmp_path / "bf16.onnx", tmp_path / "emulated" / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    a = np.array([1e-3, 55.4256, 300.7], np.float32)
    (y,) = session.run(None, {"a": a.astype(ml_dtypes.bfloat16).astype(np.float32)})
    expected = (a.astype(ml_dtypes.bfloat16).astype(np.float32) + w.astype(np.float32))
    np.testing.assert_array_equal(y, expected.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert not np.array_equal(y, a + w.astype(np.float32))  # rounding happened


def _ops(folder):
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    ops = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops, graph


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_int4_ort_graph_matches_fake_quantized_reference(tmp_path, name):
    """MatMulNBits everywhere, the tied embedding shared by lm_head (int8) and GatherBlockQuantized; with float32
    activations the graph equals a PyTorch model holding the dequantized weights."""
    L = presets.config(name).num_hidden_layers
    manifest = export(f"random:{name}", tmp_path / "a", ExportOptions(quant="int4", accuracy_level=1, progress=False))
    assert manifest.parity.passed and manifest.parity.max_abs_diff <= 1e-4
    assert manifest.parity.greedy_agreement == 1.0
    assert manifest.quantized.weights == {"int4": LINEARS_PER_LAYER * L, "int8": 1}
    q = manifest.quant
    assert (q.method, q.block_size, q.symmetric, q.lm_head) == ("gptq", 32, False, "int8")
    ops, graph = _ops(tmp_path / "a")
    assert ops["MatMulNBits"] == LINEARS_PER_LAYER * L + 1 and ops["GatherBlockQuantized"] == 1
    assert "Gather" not in ops  # the float embedding is gone: one quantized copy serves both
    float_inits = [i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2]
    assert all(min(i.dims) < 16 for i in graph.initializer if i.name in float_inits)  # no float weight left


@pytest.mark.slow  # the default run stays near 20 minutes: scripts/test.sh -m slow
def test_int4_default_accuracy_level_keeps_greedy_tokens_and_shrinks_the_artifact(tmp_path):
    fp32 = export("random:tiny-gemma3", tmp_path / "f", ExportOptions(verify=False, progress=False))
    int4 = export("random:tiny-gemma3", tmp_path / "q", ExportOptions(quant="int4", progress=False))
    assert int4.parity.passed and int4.parity.max_abs_diff <= 1e-4  # the float-activation twin
    assert int4.parity.greedy_agreement >= 0.9  # the shipped graph, int8 activations
    size = lambda m: m.files["model.onnx.data"].size  # noqa: E731
    assert size(int4) < 0.35 * size(fp32)


@pytest.mark.slow  # the default run stays near 20 minutes: scripts/test.sh -m slow
def test_hqq_and_float_lm_head(tmp_path):
    manifest = export("random:tiny-gemma2", tmp_path / "a",
                      ExportOptions(quant="int4", quant_method="hqq", lm_head="float", block_size=64,
                                    accuracy_level=1, progress=False))
    assert manifest.parity.passed and manifest.parity.max_abs_diff <= 1e-4
    assert manifest.quantized.weights["int8"] == 0
    assert manifest.quantized.skipped == ("model.lm_head.weight_t",)
    ops, _ = _ops(tmp_path / "a")
    assert ops["Gather"] == 1 and "GatherBlockQuantized" not in ops and ops["MatMul"] >= 1


HALF = [("tiny-gemma-2b", "fp16"), ("tiny-gemma3", "fp16"), ("tiny-gemma3", "bf16")]
SLOW_HALF = [("tiny-gemma-2b", "bf16"), ("tiny-gemma2", "fp16"), ("tiny-gemma2", "bf16")]


@pytest.fixture(scope="module")
def half_export(tmp_path_factory):
    """Verified half-precision exports, made once per (preset, dtype) for the tests of this module."""
    made = {}

    def get(name, dtype):
        if (name, dtype) not in made:
            folder = tmp_path_factory.mktemp(f"{name}-{dtype}") / "a"
            made[name, dtype] = folder, export(f"random:{name}", folder, ExportOptions(dtype=dtype, progress=False))
        return made[name, dtype]

    return get


@pytest.mark.parametrize("name,dtype", [*HALF, *(pytest.param(*p, marks=pytest.mark.slow) for p in SLOW_HALF)])
def test_half_precision_graphs_keep_the_residual_stream_in_float32(half_export, name, dtype):
    from exporter.divergence import layer_points

    folder, manifest = half_export(name, dtype)
    assert manifest.parity.passed and manifest.parity.max_abs_diff <= (0.1 if dtype == "fp16" else 0.6)
    assert manifest.precision.dtype == dtype and manifest.precision.residual == "fp32"
    _, graph = _ops(folder)
    elem = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[dtype]
    kv = [v for v in graph.input if v.name.startswith("past_key_values.")]
    assert all(v.type.tensor_type.elem_type == elem for v in kv)
    weights = {i.name: i.data_type for i in graph.initializer if len(i.dims) == 2}
    table = weights.pop("model.lm_head.weight_t")  # the tied embedding: float32 in bf16 graphs (next test)
    assert weights and set(weights.values()) == {elem}
    assert table == (TensorProto.FLOAT if dtype == "bf16" else elem)
    # The residual stream itself is float32: what each decoder layer hands the next (its scope's last value), and
    # the residual add inside it, after attention.
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    points = layer_points(onnx.load(str(folder / "model.onnx"), load_external_data=False))
    layer_outputs = [p.value for p in points if p.scope.rsplit(".", 1)[-1].isdigit()]
    assert len(layer_outputs) == presets.config(name).num_hidden_layers
    assert all(types[v] == TensorProto.FLOAT for v in layer_outputs)
    producers = {o: n for n in graph.node for o in n.output}
    assert all(producers[v].op_type == "Add" for v in layer_outputs)  # x + mlp(...): the residual add


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_models_scale_the_embedding_and_rotate_in_float32(dtype):
    """Two roundings that cost bf16 top-1 agreement are kept out of half-precision graphs: the residual stream
    starts as embedding * sqrt(hidden) in float32 (not 55.5 * a rounded product), and q and k are rotated in
    float32 (Gemma 3's q/k norms hand it float32)."""
    import math

    import torch

    from exporter.source import load_for_export
    from models.gemma import decoder_of, empty_past
    from models.loading import resolve
    from runtime.spec import ModelSpec, resolve as resolve_spec

    ckpt = resolve("random:tiny-gemma3")
    spec = resolve_spec(ExportOptions(dtype=dtype), ModelSpec.from_config(ckpt.config))
    model = load_for_export(ckpt, spec, progress=False)
    decoder = decoder_of(model)
    seen = {}

    def keep(key, pick):
        def hook(module, *args):
            seen[key] = pick(*args)  # and return None: the hook changes nothing
        return hook

    decoder.layers[0].register_forward_pre_hook(keep("x", lambda args: args[0]))
    decoder.layers[0].self_attn.register_forward_pre_hook(keep("cos", lambda args: args[1]))
    decoder.layers[0].self_attn.q_norm.register_forward_hook(keep("q", lambda args, out: out))
    ids = torch.tensor([[5, 17, 3]])
    with torch.no_grad():
        past = empty_past(model.config, 1, dtype=decoder.precision.dtype)
        decoder(ids, torch.arange(3)[None], torch.ones_like(ids), past)
    exact = decoder.embed_tokens.weight[ids].float() * math.sqrt(model.config.hidden_size)
    assert seen["x"].dtype == torch.float32 and torch.equal(seen["x"], exact)
    assert seen["cos"].dtype == torch.float32 and seen["q"].dtype == torch.float32


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_bfloat16_graphs_keep_scores_gelu_and_post_norms_in_float32(half_export, dtype):
    """bfloat16 graphs compute q·k, gelu(gate)·up and the post-norms in float32 (runtime/spec.py `_precision`);
    float16 graphs keep them in float16, the patterns ONNX Runtime's fusions match."""
    folder, _ = half_export("tiny-gemma3", dtype)
    _, graph = _ops(folder)
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output]}
    wide = dtype == "bf16"
    layers = presets.config("tiny-gemma3").num_hidden_layers

    def float_out(op):
        nodes = [n for n in graph.node if n.op_type == op]
        return nodes, [n for n in nodes if types.get(n.output[0]) == TensorProto.FLOAT]

    gelus, float_gelus = float_out("Gelu")
    assert len(gelus) == layers and len(float_gelus) == (layers if wide else 0)
    softmax_inputs = {n.input[0] for n in graph.node if n.op_type == "Softmax"}
    producers = {o: n for n in graph.node for o in n.output}
    # q·k: walk back from each softmax through the mask, the scaling and the reshapes to its MatMul
    for name in softmax_inputs:
        node = producers[name]
        while node.op_type != "MatMul":
            node = producers[node.input[0] if node.op_type != "Where" else node.input[2]]
        assert (types[node.output[0]] == TensorProto.FLOAT) == wide
    # A post-norm's output rounded to half and widened again for the float32 residual add: Cast(Cast(x))
    round_trips = [n for n in graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT
                   and getattr(producers.get(n.input[0]), "op_type", None) == "Cast"]
    assert len(round_trips) == 0 if wide else len(round_trips) >= 2 * layers


def test_bfloat16_graphs_store_the_tied_embedding_once_in_float32(half_export):
    """lm_head runs in float32 in bf16 graphs (bf16 logits near 20 are 0.125 apart): the tied table is kept in
    float32, with the values of the float32 model, rather than rounded to bf16 and cast back (the spec's
    precision.vocab_table); the layers' weights are bf16, and the plan's estimate says so."""
    import torch

    from exporter.source import load_for_export
    from exporter.trt.plan import estimate_weight_bytes, weight_bytes
    from models.gemma import decoder_of
    from models.loading import load_model, resolve
    from runtime.spec import ModelSpec, resolve as resolve_spec

    ckpt = resolve("random:tiny-gemma3")
    exact, _ = load_model(ckpt, progress=False)
    spec = resolve_spec(ExportOptions(dtype="bf16"), ModelSpec.from_config(ckpt.config))
    assert spec.precision.vocab_table == "fp32"
    model = load_for_export(ckpt, spec, progress=False)
    table = decoder_of(model).embed_tokens.weight
    assert table.dtype == torch.float32 and torch.equal(table, decoder_of(exact).embed_tokens.weight)
    assert model.lm_head.weight is table and decoder_of(model).norm.weight.dtype == torch.bfloat16
    layer = decoder_of(model).layers[0].mlp.down_proj.weight
    assert torch.equal(layer, decoder_of(exact).layers[0].mlp.down_proj.weight.to(torch.bfloat16))

    folder, manifest = half_export("tiny-gemma3", "bf16")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    tables = [n for n in graph.graph.node if "model.lm_head.weight_t" in n.input]
    assert sorted(n.op_type for n in tables) == ["Gather", "MatMul"]  # one float32 table, no Cast to a copy
    config = presets.config("tiny-gemma3")
    held, estimate = weight_bytes(graph), estimate_weight_bytes(config, manifest.precision)
    assert held["bfloat16"] == estimate["bfloat16"]
    assert 0 <= held["float"] - estimate["float"] < 4096  # the table and the norms, + rotary constants
    assert manifest.parity.passed


def test_bfloat16_untied_lm_head_is_float32_too(tmp_path):
    """A checkpoint with its own lm_head (fine-tuned, untied): both vocabulary tables are float32 in a bf16
    graph, so its logits are not rounded to bf16 either."""
    import torch

    from models import config_from_dict
    from models.loading import random_model
    from tests.reference import save_folder

    config = config_from_dict({**presets.config("tiny-gemma3").to_dict(), "tie_word_embeddings": False})
    model = random_model(config)
    head = torch.randn(config.vocab_size, config.hidden_size) / config.hidden_size**0.5
    model.lm_head.weight = torch.nn.Parameter(head)  # its own, no longer the embedding
    save_folder(model, tmp_path / "ckpt")
    manifest = export(tmp_path / "ckpt", tmp_path / "a", ExportOptions(dtype="bf16", progress=False))
    assert manifest.parity.passed
    graph = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False).graph
    types = {i.name: i.data_type for i in graph.initializer if len(i.dims) == 2}
    assert types.pop("model.lm_head.weight") == types.pop("model.model.embed_tokens.weight_t") == TensorProto.FLOAT
    assert set(types.values()) == {TensorProto.BFLOAT16}
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_fp16_runs_in_the_runtime(half_export):
    """Finite logits, and the greedy tokens of the float32 PyTorch model."""
    import torch

    import runtime
    from models.loading import random_model
    from tests.reference import torch_greedy

    model = runtime.load(half_export("tiny-gemma3", "fp16")[0])
    prompt = np.array([[2, 17, 30, 41]])
    model.backend.reset(1, 16)
    logits = model.backend.forward(prompt, np.ones_like(prompt), np.arange(4)[None], all_logits=True)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    tokens = model.generate(prompt, max_new_tokens=12, eos_token_id=[])[0, 4:]
    reference = torch_greedy(random_model(presets.config("tiny-gemma3")), torch.from_numpy(prompt),
                             torch.ones(1, 4, dtype=torch.long), 12)[0]
    assert tokens.tolist() == reference.tolist()


@pytest.mark.parametrize("dtype", ["fp16", pytest.param("bf16", marks=pytest.mark.slow)])
def test_trt_graph_is_standard_onnx_with_int4_qdq(tmp_path, dtype):
    L = presets.config("tiny-gemma3").num_hidden_layers
    manifest = export("random:tiny-gemma3", tmp_path / "a",
                      ExportOptions(target="trt", quant="int4", dtype=dtype, progress=False, build=False))
    assert manifest.parity.passed and manifest.graph.target == "trt"
    assert (manifest.quant.format, manifest.quant.symmetric, manifest.quant.lm_head) == ("qdq", True, "int4")
    ops, graph = _ops(tmp_path / "a")
    assert all(not n.domain or n.domain == "ai.onnx" for n in graph.node)  # no com.microsoft operator
    assert ops["DequantizeLinear"] == LINEARS_PER_LAYER * L + 1
    dq_weights = {i.name for i in graph.initializer if i.data_type == TensorProto.INT4}
    assert len(dq_weights) == LINEARS_PER_LAYER * L + 1
    assert {o.version for o in onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False).opset_import
            if o.domain in ("", "ai.onnx")} == {21}
    # in topological order, as TensorRT's parser reads it: the tied table's DequantizeLinear precedes the lookup
    _assert_topological(graph)


def test_trt_target_defaults_to_fp16(tmp_path):
    manifest = export("random:tiny-gemma-2b", tmp_path / "a", ExportOptions(target="trt", progress=False, build=False))
    assert manifest.precision.dtype == "fp16" and manifest.parity.passed


@pytest.mark.parametrize("options,message", [
    (dict(target="trt", quant="int4", quant_method="hqq"), "symmetric round-to-nearest"),
    (dict(target="trt", quant="int4", lm_head="int8"), "--lm-head int4"),
    (dict(quant="int4", block_size=48), "block size 48"),
    (dict(quant="int3"), "quant 'int3'"),
])
def test_bad_quantization_options_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        export("random:tiny-gemma3", tmp_path / "a", ExportOptions(progress=False, **options))
    assert not (tmp_path / "a").exists()


@pytest.mark.slow  # the default run stays near 20 minutes: scripts/test.sh -m slow
def test_cli_prints_the_quantization(tmp_path):
    result = CliRunner().invoke(export_command, ["-m", "random:tiny-gemma3", "-o", str(tmp_path / "a"), "-q",
                                                 "--quant", "int4", "--block-size", "64", "--accuracy-level", "1"])
    assert result.exit_code == 0, result.output
    assert "quantization: gptq block 64" in result.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["quant"]["block_size"] == 64 and manifest["quant"]["accuracy_level"] == 1
    bad = CliRunner().invoke(export_command, ["-m", "random:tiny-gemma3", "-o", str(tmp_path / "b"), "-q",
                                              "--target", "trt", "--quant", "int4", "--quant-method", "hqq"])
    assert bad.exit_code == 2 and "symmetric" in bad.output


def test_gptq_beats_rtn_on_the_layer_output_it_was_calibrated_for():
    import torch

    from exporter.gptq import gptq_weight

    generator = torch.Generator().manual_seed(0)
    X = torch.randn(512, 96, generator=generator) @ torch.randn(96, 96, generator=generator)  # correlated inputs
    W = torch.randn(48, 96, generator=generator)
    blocks = gptq_weight(W, 2 * X.T @ X / X.shape[0], block_size=32)
    baseline = rtn(W.T.numpy(), 4, 32, symmetric=False)
    out_error = lambda b: float(((X @ W.T - X @ torch.from_numpy(b.dequantize())) ** 2).mean())  # noqa: E731
    assert out_error(blocks) < 0.8 * out_error(baseline)
    q = np.stack([blocks.packed & 0xF, blocks.packed >> 4], -1)
    assert q.max() <= 15 and blocks.zero_points.dtype == np.uint8  # MatMulNBits' grid


def test_gptq_grid_search_beats_the_min_max_grid():
    """The MSE range search (exporter.gptq._grid) never does worse than its first candidate, ONNX Runtime's
    min/max grid, and does better on heavy-tailed rows, where clipping the outliers refines the rest."""
    import torch

    from exporter.gptq import _grid

    torch.manual_seed(0)
    rows = torch.distributions.StudentT(3.0).sample((256, 32))  # weights' heavy tails
    low, high = torch.clamp(rows.min(1).values, max=0), torch.clamp(rows.max(1).values, min=0)
    minmax_scale = (high - low) / 15
    minmax_zero = torch.round(-low / minmax_scale)

    def error(scale, zero):
        q = torch.clamp(torch.round(rows / scale[:, None]) + zero[:, None], 0, 15)
        return ((q - zero[:, None]) * scale[:, None] - rows).abs().pow(2.4).sum(1)

    scale, zero = _grid(rows)
    assert zero.min() >= 0 and zero.max() <= 15 and torch.equal(zero, zero.round())
    searched, minmax = error(scale, zero), error(minmax_scale, minmax_zero)
    assert (searched <= minmax + 1e-6).all()
    assert searched.sum() < 0.98 * minmax.sum()  # 0.958 measured here
    assert (searched < minmax - 1e-6).float().mean() > 0.3


@pytest.mark.slow  # the default run stays near 20 minutes: scripts/test.sh -m slow
def test_gptq_export_and_mixed_int8_recipe(tmp_path):
    L = presets.config("tiny-gemma3").num_hidden_layers
    manifest = export("random:tiny-gemma3", tmp_path / "a",
                      ExportOptions(quant="int4", quant_method="gptq", accuracy_level=1,
                                    int8_weights=("v_proj", "down_proj"), progress=False))
    assert manifest.parity.passed and manifest.parity.max_abs_diff <= 1e-4
    assert manifest.quantized.weights == {"int4": 5 * L, "int8": 2 * L + 1}
    assert manifest.quant.method == "gptq"


def test_runtime_refuses_a_bfloat16_artifact_with_the_fix(half_export):
    import runtime

    with pytest.raises(ValueError, match="bfloat16.*--dtype fp16"):
        runtime.load(half_export("tiny-gemma3", "bf16")[0])


@pytest.mark.real
@pytest.mark.slow  # the default run stays near 20 minutes: scripts/test.sh -m slow
def test_fp16_real_model_stays_finite_over_a_1000_token_prompt(tmp_path, real_model_dir):
    """Gemma's residual stream overflows float16; with it kept in float32 the logits of 1,000+ real tokens stay
    finite (top-1 agreement with float32 is an accuracy figure: scripts/bench_accuracy.py)."""
    import runtime
    from exporter.gptq import CALIBRATION_TEXT
    from tests.reference import LONG_PROMPT

    export("gemma3-270m", tmp_path / "fp16", ExportOptions(dtype="fp16", verify=False, progress=False))
    model = runtime.load(tmp_path / "fp16", verify=False)
    ids = np.array([model.tokenizer.encode(CALIBRATION_TEXT.read_text()[:4500] + LONG_PROMPT)])
    assert ids.shape[1] >= 1000
    model.backend.reset(1, ids.shape[1])
    logits = model.backend.forward(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], all_logits=True)[0]
    assert np.isfinite(logits).all()
    assert np.abs(logits).max() < 1e3


def test_gptq_calibrates_a_static_layout_model(tmp_path):
    """GPTQ runs the model it quantizes: built in the static layout, it gets buffers of its own to write into, a
    ring for the sliding layers (and rows of one chunk, the most a ring takes in a run)."""
    manifest = export("random:tiny-gemma2", tmp_path / "a",
                      ExportOptions(quant="int4", accuracy_level=1, kv_cache="static", max_length=48, progress=False))
    assert manifest.quant.method == "gptq" and manifest.kv.layout == "static" and manifest.kv.sliding_cache == "ring"
    assert manifest.parity.passed and manifest.parity.max_abs_diff <= 1e-4


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q5_0", "Q4_0"])
def test_ggml_blocks_give_back_a_gguf_block_bit_for_bit(ggml_type):
    """Weights dequantized from a llama.cpp block (gguf's own quantizer) come back exactly from ggml_blocks, and
    ONNX Runtime's MatMulNBits and GatherBlockQuantized decode them as Blocks.dequantize does."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from exporter.blocks import ggml_blocks

    rng = np.random.default_rng(0)
    K, N = 96, 40
    kind = getattr(GGMLQuantizationType, ggml_type)
    stored = dequantize(quantize(rng.standard_normal((N, K)).astype(np.float32), kind), kind).reshape(N, K).T
    blocks = ggml_blocks(np.ascontiguousarray(stored), ggml_type)
    assert blocks.zero_points is None and blocks.block_size == 32
    assert blocks.scales.dtype == np.float16  # the GGUF's own: the graph stores them so, widened at load
    np.testing.assert_array_equal(blocks.dequantize(), stored)
    fresh = rng.standard_normal((K, N)).astype(np.float32)  # not on the grid: quantized, within a step
    error = np.abs(ggml_blocks(fresh, ggml_type).dequantize() - fresh).max()
    assert 0 < error < {"Q8_0": 0.03, "Q5_0": 0.25, "Q4_0": 0.5}[ggml_type]

    inits = [numpy_helper.from_array(blocks.packed, "B"), numpy_helper.from_array(blocks.scales.astype(np.float32), "S"),
             numpy_helper.from_array(np.array([N, -1], np.int64), "rows")]
    nodes = [
        helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=K, N=N, bits=blocks.bits,
                         block_size=32),
        helper.make_node("Reshape", ["B", "rows"], ["_"]),
        helper.make_node("GatherBlockQuantized", ["_", "ids", "S"], ["e"], domain="com.microsoft", bits=blocks.bits,
                         block_size=32, gather_axis=0, quantize_axis=1),
    ]
    x = rng.standard_normal((3, K)).astype(np.float32)
    ids = np.array([0, 7, N - 1])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, [3])]
    y, e = _run(nodes, inputs, {"x": x, "ids": ids}, inits)
    np.testing.assert_allclose(y, x @ stored, atol=1e-4)
    np.testing.assert_array_equal(e, stored[:, ids].T)


def test_gguf_method_carries_the_packaged_models_blocks(real_model_dir):
    """The packaged model's float weights are its GGUF's blocks: the Q8_0 table and the Q5_0 tensors come back
    bit for bit; its Q4_K tensors go to 4 bits with an offset a block, within 1/100 of their own step."""
    from safetensors.numpy import load_file

    from exporter.quantize import _carried, _ggml_type
    from models import packaged
    from models.gguf_file import gguf_tensor_types

    types = gguf_tensor_types(packaged.gguf_path())
    assert _ggml_type(types, "model.lm_head.weight_t", tied=True) == "Q8_0"
    weights = load_file(str(real_model_dir / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.o_proj.weight"):
        rows = weights[name][:16384]  # the table's first 16k rows (a row's blocks are its own), the others whole
        w = np.ascontiguousarray(rows.astype(np.float32).T)  # [K, N] as the graph holds it
        ggml_type = types[name]
        blocks = _carried(w, ggml_type)
        if ggml_type in ("Q8_0", "Q5_0"):
            np.testing.assert_array_equal(blocks.dequantize(), w)
        else:  # Q4_K: 4 bits and an offset a block, within 1/100 of the block's own step
            assert ggml_type == "Q4_K" and blocks.bits == 4 and blocks.offsets is not None
            error = np.abs(blocks.dequantize() - w).reshape(-1, 32, w.shape[1]).max(1)
            assert (error <= blocks.scales.astype(np.float32).T / 100).all()


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q4_1"])
def test_grid_blocks_hold_a_gguf_block_and_the_graph_adds_its_offsets(tmp_path, ggml_type):
    """A block of 16 levels from a minimum (gguf's own quantizer) is 4 bits and a float offset, within 1/100 of its
    step; the pass writes MatMulNBits with the blocks' sums as extra columns, their product with the offsets, and
    (after packing) their sum taken into the norm after it, as its skip: the graph equals x @ (the dequantized W)."""
    import onnx_ir as ir
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from exporter.blocks import grid_blocks
    from exporter.fusions import pack_for_ort
    from exporter.quantize import quantize_graph
    from runtime.spec import QuantSpec

    rng = np.random.default_rng(0)
    K, N = 512, 48
    if ggml_type == "Q4_K":  # gguf-py does not quantize it: ggml's dequantization of random blocks, 0 in each range
        d = rng.uniform(0.001, 0.01, (N, K // 256, 1)).astype(np.float16).astype(np.float32)
        d_min = (d * 15).astype(np.float16).astype(np.float32)
        scale = d * rng.integers(1, 64, (N, K // 256, 8))
        minimum = d_min * np.clip(np.rint(scale * rng.uniform(0, 15, scale.shape) / d_min), 0, 63)
        q = rng.integers(0, 16, (N, K // 32, 32))
        stored = (scale.reshape(N, -1, 1) * q - minimum.reshape(N, -1, 1)).reshape(N, K).T
    else:
        kind = getattr(GGMLQuantizationType, ggml_type)
        stored = dequantize(quantize(rng.standard_normal((N, K)).astype(np.float32), kind), kind).reshape(N, K).T
    stored = np.ascontiguousarray(stored, dtype=np.float32)
    blocks = grid_blocks(stored)
    assert blocks.bits == 4 and blocks.scales.dtype == blocks.offsets.dtype == np.float16
    error = np.abs(blocks.dequantize() - stored).reshape(K // 32, 32, N).max(1)
    assert (error <= blocks.scales.astype(np.float32).T / 100).all()
    assert (error.max() == 0) == (ggml_type == "Q4_1")  # Q4_1's scale and minimum are float16 already: exact
    fresh = rng.standard_normal((K, N)).astype(np.float32)  # on no grid: rounded to 15 steps, within half of one
    assert np.abs(grid_blocks(fresh).dequantize() - fresh).max() < 0.55 * (np.ptp(fresh, 0).max() / 15)

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", N])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("SimplifiedLayerNormalization", ["h", "g"], ["y"], axis=-1, epsilon=1e-6)]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(stored, "W"),
                                                       numpy_helper.from_array(np.ones(N, np.float32), "g")],
                              value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "S", N])])
    path = tmp_path / "model.onnx"
    ir.save(ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])), path)
    quant = QuantSpec(method="gguf", bits=4, block_size=32, symmetric=False, lm_head="int8", format="matmulnbits",
                      accuracy_level=1, int8_weights=())
    result, dequantized = quantize_graph(path, quant, progress=False, ggml_types={"W": ggml_type})
    assert result.weights == {"int4": 1, "int8": 0}
    np.testing.assert_array_equal(dequantized["W"], blocks.dequantize())
    assert pack_for_ort(path) == {"skip_rms_offsets": 1}
    ops, _ = _ops(tmp_path)
    assert ops == {"Cast": 2, "MatMulNBits": 1, "Split": 1, "MatMul": 1, "SkipSimplifiedLayerNormalization": 1}

    feed = rng.standard_normal((1, 5, K)).astype(np.float32)
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": feed})
    h = feed @ dequantized["W"]
    expected = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_a_gguf_of_q4_k_projections_exports_fused_and_equals_its_reference(tmp_path, monkeypatch):
    """A GGUF whose every projection is Q4_K (tiny-gemma3, its types stood in for): each projection takes the
    offsets' Split and MatMul, q/k/v and gate/up stay unpacked (the packing rules do not match them), the Adds
    after o and down go into the norms, and the fused graph equals the PyTorch model holding the dequantized
    weights."""
    from models.loading import Checkpoint

    def types(self):
        return {name: "Q8_0" if "embed" in name else "Q4_K" for name in _projection_names(self.config)}

    monkeypatch.setattr(Checkpoint, "ggml_types", types)
    config = presets.config("tiny-gemma3")
    L = config.num_hidden_layers
    manifest = export("random:tiny-gemma3", tmp_path / "a",
                      ExportOptions(target="ort", quant="int4", accuracy_level=1, progress=False))
    assert manifest.quant.method == "gguf" and manifest.quantized.weights == {"int4": LINEARS_PER_LAYER * L,
                                                                             "int8": 1}
    assert manifest.parity.passed and manifest.parity.max_abs_diff <= 1e-4 and manifest.parity.greedy_agreement == 1
    assert manifest.fusions["skip_rms_offsets"] == 2 * L and "packed_attention" not in manifest.fusions
    ops, graph = _ops(tmp_path / "a")
    offsets = [n for n in graph.node if n.op_type == "MatMul" and n.name.endswith("_offsets")]
    assert ops["Split"] == len(offsets) == LINEARS_PER_LAYER * L and ops["GroupQueryAttention"] == L
    assert ops["Add"] == (LINEARS_PER_LAYER - 2) * L  # q, k, v, gate, up: no norm right after them


def _projection_names(config) -> list[str]:
    """The Hugging Face names of the embedding and every layer's projections."""
    parts = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    layers = range(config.num_hidden_layers)
    return ["model.embed_tokens.weight"] + [f"model.layers.{i}.{part}.weight" for i in layers for part in parts]


def test_gguf_method_needs_a_gguf_and_takes_no_recipe(tmp_path):
    with pytest.raises(ValueError, match="has no GGUF: pass a .gguf file"):
        export("random:tiny-gemma3", tmp_path / "a", ExportOptions(quant="int4", quant_method="gguf", progress=False))
    with pytest.raises(ValueError, match="drop --int8-weights"):
        export("random:tiny-gemma3", tmp_path / "a", ExportOptions(quant="int4", quant_method="gguf",
                                                                   int8_weights=("v_proj",), progress=False))
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("target", ["onnx", pytest.param("trt", marks=pytest.mark.slow)])  # the default run stays
def test_gemma4_per_layer_embeddings_are_quantized_like_the_tied_table(tmp_path, target):  # near 20 minutes
    """tiny-gemma4: its per-layer table [vocab, layers x 8] leaves no float copy: GatherBlockQuantized on its packed
    rows (int8 blocks, as the tied table's), or int4 DequantizeLinear along its rows feeding the Gather (TensorRT);
    the graph still equals the reference with the dequantized weights, and TensorRT's stays in topological order."""
    config = presets.config("tiny-gemma4")
    options = ExportOptions(target=target, quant="int4", progress=False, build=False,
                            accuracy_level=1 if target == "onnx" else 4)
    manifest = export("random:tiny-gemma4", tmp_path / "a", options)
    assert manifest.parity.passed and manifest.parity.greedy_agreement == 1.0
    assert manifest.parity.max_abs_diff <= (1e-4 if target == "onnx" else 0.1)
    ops, graph = _ops(tmp_path / "a")
    table = "model.model.embed_tokens_per_layer.weight"
    assert table not in {i.name for i in graph.initializer}
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    L, P, V = config.num_hidden_layers, config.hidden_size_per_layer_input, config.vocab_size_per_layer_input
    if target == "onnx":
        assert ops["GatherBlockQuantized"] == 2  # the tied table and the per-layer one
        assert shapes[f"{table}_Q8"] == (V, L * P) and manifest.quantized.weights["int8"] == 2
    else:
        assert shapes[f"{table}_int4"] == (V, L * P) and shapes[f"{table}_scales"] == (V, L * P // 32)
        _assert_topological(graph)


def test_gemma4_mixture_of_experts_int4(tmp_path):
    """tiny-gemma4-moe in int4: its experts' batched MatMuls stay float (MatMulNBits takes one [K, N] weight) and
    the graph equals the fake-quantized reference with float32 activations (the int8 ones flip its random router:
    the export's parity error says to pass --accuracy-level 1)."""
    manifest = export("random:tiny-gemma4-moe", tmp_path / "a", ExportOptions(quant="int4", accuracy_level=1,
                                                                                progress=False))
    assert manifest.parity.passed and manifest.parity.max_abs_diff <= 1e-4 and manifest.parity.greedy_agreement == 1.0
    ops, graph = _ops(tmp_path / "a")
    config = presets.config("tiny-gemma4-moe")
    experts = [i for i in graph.initializer if "experts" in i.name]
    assert len(experts) == 2 * config.num_hidden_layers  # gate_up and down, each one named float copy
    assert all(len(i.dims) == 3 and i.dims[0] == config.num_experts for i in experts)
    assert all(i.data_type == TensorProto.FLOAT for i in experts)
    assert ops["TopK"] == config.num_hidden_layers  # the router's, one a layer
