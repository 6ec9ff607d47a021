"""--target trt up to the point where TensorRT is needed: the build plan (profiles, byte counts checked by
hand for gemma-2b and gemma-7b), the operator check, the exit code and message without TensorRT, the
resume command, and the divergence locator. The engine build itself is in test_trt_gpu.py (marked gpu)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from exporter import ExportOptions, export
from exporter.api import build_trt_engine
from exporter.cli import export_command, parity_command
from exporter.divergence import layer_points, locate, marked_copy, onnxruntime_outputs
from exporter.trt.build import UnsupportedOperators
from exporter.trt.plan import estimate_weight_bytes, kv_cache_bytes, make_plan, profile_ranges
from models import presets
from runtime.exit_codes import NO_TENSORRT
from runtime.manifest import read_manifest, write_manifest
from runtime.spec import BuildLimits, ModelSpec, resolve
from runtime.trt_device import TensorRTUnavailable

GIB = 2**30


@pytest.fixture(scope="module")
def trt_cli(tmp_path_factory):
    """`gemma-export --target trt` of tiny-gemma3 on this machine (no TensorRT): its result and folder."""
    folder = tmp_path_factory.mktemp("trt") / "tiny"
    result = CliRunner().invoke(export_command, ["-m", "random:tiny-gemma3", "-o", str(folder), "--target", "trt",
                                                 "--max-batch-size", "2", "--max-length", "96", "--max-input-len", "32",
                                                 "-q"])
    return result, folder


# -- byte counts, by hand ------------------------------------------------------------------------------


def _spec(name: str, **options):
    return resolve(ExportOptions(**options), ModelSpec.from_config(presets.config(name)))


def _kv(name: str):
    return _spec(name, dtype="fp16").kv


def test_kv_cache_bytes_by_hand():
    limits = BuildLimits(max_batch_size=4, max_input_len=512, max_length=2048)
    # gemma-2b: 18 layers x 1 KV head x 256 x 2 (k, v) x 2 bytes = 18,432 bytes a token
    assert kv_cache_bytes(_kv("gemma-2b"), limits) == 18 * 1 * 256 * 2 * 2 * 4 * 2048 == 150_994_944
    # gemma-7b: 28 layers x 16 KV heads x 256 x 2 x 2 = 458,752 bytes a token
    assert kv_cache_bytes(_kv("gemma-7b"), limits) == 458_752 * 4 * 2048 == 3_758_096_384


def test_weight_bytes_by_hand():
    # gemma-2b: per layer q, o 2048x2048; k, v 2048x256; gate, up, down 2048x16384 -> 110,100,480 weights;
    # 18 layers + the tied embedding 256000 x 2048 = 2,506,096,640; norms 2 a layer + final: 75,776.
    fp16 = estimate_weight_bytes(presets.config("gemma-2b"), _spec("gemma-2b", dtype="fp16").precision)
    assert fp16 == {"float16": 2_506_096_640 * 2, "float": 75_776 * 4}
    # gemma-7b: q, k, v, o 3072x4096 each; mlp 3 x 3072x24576 -> 276,824,064 a layer; x 28 + 256000 x 3072
    fp16 = estimate_weight_bytes(presets.config("gemma-7b"), _spec("gemma-7b", dtype="fp16").precision)
    assert fp16 == {"float16": (28 * 276_824_064 + 786_432_000) * 2, "float": (28 * 2 * 3072 + 3072) * 4}
    assert sum(fp16.values()) / 1e9 == pytest.approx(17.08, abs=0.01)  # the 8.54B-parameter model in 2 bytes
    # int4, TensorRT's flavour: symmetric, block 32, lm_head int4 -> half a byte a weight + one fp16 scale a block
    spec = _spec("gemma-2b", target="trt", quant="int4")
    int4 = estimate_weight_bytes(presets.config("gemma-2b"), spec.precision, spec.quant)
    assert int4 == {"int4": 2_506_096_640 // 2, "float16": 2_506_096_640 // 32 * 2, "float": 75_776 * 4}


@pytest.mark.parametrize("name,per_token", [("gemma-4-e2b", 18_432), ("gemma-4-e4b", 57_344),
                                            ("gemma-4-31b", 901_120), ("gemma-4-26b-a4b", 225_280)])
def test_gemma4_kv_cache_counts_storing_layers_only(name, per_token):
    """fp16 bytes a token (tests/models/test_gemma4.py counts them by layer): E2B's 15 storing layers of 35 hold
    18,432 where 43,008 would be without sharing; the static layout's ring cuts the sliding layers to 1024 slots."""
    limits = BuildLimits(max_batch_size=2, max_input_len=512, max_length=4096)
    kv = _kv(name)
    assert kv.bytes_per_token() == per_token and kv_cache_bytes(kv, limits) == per_token * 2 * 4096
    assert kv.num_layers == len(presets.config(name).kv_layers) and len(kv.past_names) == 2 * kv.num_layers
    ring = _spec(name, dtype="fp16", kv_cache="static", max_length=4096).kv
    assert ring.sliding_cache == "ring" and kv_cache_bytes(ring, limits) < kv_cache_bytes(kv, limits)


def test_gemma4_graph_weights_match_the_estimate(tmp_path):
    """tiny-gemma4 in TensorRT's int4: the per-layer table, the tied one and the layers' weights as counted on the
    meta-device model before anything is traced."""
    options = ExportOptions(target="trt", quant="int4", verify=False, build=False, progress=False)
    manifest = export("random:tiny-gemma4", tmp_path / "a", options)
    estimate = estimate_weight_bytes(presets.config("tiny-gemma4"), manifest.precision, manifest.quant)
    held = manifest.plan.weight_bytes
    assert held["int4"] == estimate["int4"] and held["float16"] == estimate["float16"]
    assert 0 <= held["float"] - estimate["float"] < 4096  # + rotary tables


def test_plan_only_prints_gemma_7b_plan():
    result = CliRunner().invoke(export_command, ["-m", "random:gemma-7b", "--target", "trt", "--plan-only",
                                                 "--max-batch-size", "4", "--max-length", "2048"])
    assert result.exit_code == 0, result.output
    assert "KV cache at max batch and length: 3.500 GiB (device buffers 7.000 GiB)" in result.output
    fp16_bytes = (28 * 276_824_064 + 786_432_000) * 2  # the hand count of test_weight_bytes_by_hand
    assert f"float16 {fp16_bytes / 2**30:.3f} GiB" in result.output
    assert "profile prefill" in result.output and "profile decode" in result.output


def test_plan_only_needs_target_trt():
    result = CliRunner().invoke(export_command, ["-m", "random:gemma-2b", "--plan-only"])
    assert result.exit_code == 2 and "--target trt" in result.output


# -- profiles -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limits", [BuildLimits(1, 512, 2048), BuildLimits(8, 128, 4096), BuildLimits(2, 96, 96)])
def test_profile_corners_keep_total_equal_past_plus_new(limits):
    for ranges in profile_ranges(limits).values():
        for corner in range(3):  # min, opt, max
            new, past, total = (ranges[k][corner] for k in
                                ("sequence_length", "past_sequence_length", "total_sequence_length"))
            assert total == past + new
            assert 1 <= new <= limits.max_input_len and total <= limits.max_length


def test_limits_are_checked():
    with pytest.raises(ValueError, match="--max-input-len 600 exceeds --max-length 512"):
        _spec("tiny-gemma3", target="trt", max_input_len=600, max_length=512)
    with pytest.raises(ValueError, match="--max-batch-size 0 must be a positive integer"):
        _spec("tiny-gemma3", target="trt", max_batch_size=0)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        _spec("tiny-gemma3", target="trt", max_length=10**6)
    with pytest.raises(ValueError, match="optimization-level 7"):
        _spec("tiny-gemma3", target="trt", optimization_level=7)


# -- the export without TensorRT -------------------------------------------------------------------------


def test_export_without_tensorrt_exits_3_with_the_resume_command(trt_cli):
    result, folder = trt_cli
    assert result.exit_code == NO_TENSORRT, result.output
    assert "pip install 'gemma-deploy[trt]'" in result.output
    assert f"gemma-export --resume-build {folder}" in result.output
    manifest = read_manifest(folder)  # complete and verified: only the engine is missing
    assert manifest.engines == () and manifest.parity.passed


def test_plan_is_stored_in_the_manifest(trt_cli):
    _, folder = trt_cli
    manifest = read_manifest(folder)
    plan = manifest.plan
    assert manifest.trt.limits == BuildLimits(2, 32, 96) and plan.supported
    prefill, decode = plan.profiles
    assert prefill.shapes["input_ids"] == ((1, 1), (1, 16), (2, 32))
    assert decode.shapes["input_ids"] == ((1, 1), (1, 1), (2, 1))
    assert decode.shapes["past_key_values.5.value"] == ((1, 2, 0, 32), (1, 2, 47, 32), (2, 2, 95, 32))
    assert decode.contains({"input_ids": (2, 1), "attention_mask": (2, 96)})
    assert not decode.contains({"input_ids": (1, 2)})
    kv = manifest.kv
    assert plan.kv_cache_bytes == 2 * kv.num_layers * 2 * 96 * kv.num_kv_heads * kv.head_dim * 2
    assert plan.kv_buffer_bytes == 2 * plan.kv_cache_bytes  # two sets, swapped each step
    config = presets.config("tiny-gemma3")
    assert plan.logits_buffer_bytes == 2 * 32 * config.vocab_size * 4
    estimate = estimate_weight_bytes(config, manifest.precision)
    assert plan.weight_bytes["float16"] == estimate["float16"]  # the graph holds what the config says
    assert 0 <= plan.weight_bytes["float"] - estimate["float"] < 4096  # + rotary tables


@pytest.mark.slow  # an export each; the default run stays near 20 minutes
def test_int4_graph_weights_match_the_estimate(tmp_path):
    options = ExportOptions(target="trt", quant="int4", verify=False, build=False, progress=False)
    manifest = export("random:tiny-gemma3", tmp_path / "int4", options)
    plan = manifest.plan
    estimate = estimate_weight_bytes(presets.config("tiny-gemma3"), manifest.precision, manifest.quant)
    assert plan.weight_bytes["int4"] == estimate["int4"]
    assert plan.weight_bytes["float16"] == estimate["float16"]
    assert plan.supported, plan.operators  # blocked int4 DequantizeLinear is in TensorRT's table


def test_no_build_and_resume_build(trt_cli, tmp_path):
    _, folder = trt_cli
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    result = CliRunner().invoke(export_command, ["--resume-build", str(copy), "-q"])
    assert result.exit_code == NO_TENSORRT and f"--resume-build {copy}" in result.output
    result = CliRunner().invoke(export_command, ["--resume-build", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_python_export_raises_tensorrt_unavailable_after_writing(tmp_path):
    with pytest.raises(TensorRTUnavailable, match="--resume-build"):
        export("random:tiny-gemma-2b", tmp_path / "a", ExportOptions(target="trt", verify=False, progress=False))
    assert read_manifest(tmp_path / "a").plan.profiles


@pytest.mark.slow  # an export each; the default run stays near 20 minutes
def test_unsupported_operators_are_caught_before_the_build(tmp_path):
    """An ONNX Runtime-fused graph (com.microsoft operators) cannot be built: the plan says which, and the
    build refuses before looking for TensorRT."""
    import dataclasses

    ort = export("random:tiny-gemma3", tmp_path / "ort", ExportOptions(target="ort", kv_cache="dynamic", verify=False,
                                                                      progress=False))
    as_trt = dataclasses.replace(ort, graph=dataclasses.replace(ort.graph, target="trt"),
                                 trt=_spec("tiny-gemma3", target="trt", max_input_len=16, max_length=64).trt)
    plan = make_plan(tmp_path / "ort" / "model.onnx", as_trt)
    assert not plan.supported
    assert "SimplifiedLayerNormalization" in " ".join(plan.operators["unsupported"])
    write_manifest(tmp_path / "ort", dataclasses.replace(as_trt, plan=plan))
    with pytest.raises(UnsupportedOperators, match="SimplifiedLayerNormalization"):
        build_trt_engine(tmp_path / "ort")


# -- parity through a runtime backend, and the divergence locator --------------------------------------------


def test_parity_through_the_runtime_backend(trt_cli):
    _, folder = trt_cli
    result = CliRunner().invoke(parity_command, [str(folder), "-m", "random:tiny-gemma3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] and report["backend"].startswith("runtime: OnnxRuntimeBackend")
    # the runtime's backend (IO binding, KV buffers) and a plain session on the same graph agree exactly
    assert max(r["max_abs_diff"] for r in report["vs_onnxruntime"]) < 1e-3


def test_parity_on_tensorrt_without_it_exits_3(trt_cli):
    _, folder = trt_cli
    result = CliRunner().invoke(parity_command, [str(folder), "-m", "random:tiny-gemma3", "--backend", "tensorrt"])
    assert result.exit_code == NO_TENSORRT and "TensorRT" in result.output


def test_locate_finds_the_first_diverging_layer(trt_cli, tmp_path):
    """A copy of the graph with layer 2's MLP weights changed stands in for a faulty engine."""
    _, folder = trt_cli
    graph = onnx.load(str(folder / "model.onnx"))
    for tensor in graph.graph.initializer:
        if tensor.name == "model.model.layers.2.mlp.down_proj.weight":
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 3, tensor.name))
    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad" / "model.onnx"
    onnx.save(graph, str(bad), save_as_external_data=True, location="model.onnx.data")

    points = layer_points(onnx.load(str(bad), load_external_data=False))
    assert [p.scope for p in points[:3]] == ["model.model.layers.0.self_attn", "model.model.layers.0.mlp",
                                             "model.model.layers.0"]
    assert len(points) == 3 * presets.config("tiny-gemma3").num_hidden_layers

    def faulty(marked, feeds, names):
        with marked_copy(bad, points) as copy:
            return onnxruntime_outputs(copy, feeds, names)

    feeds = {"input_ids": np.array([[5, 6, 7, 8]]), "attention_mask": np.ones((1, 4), np.int64),
             "position_ids": np.arange(4)[None],
             **{f"past_key_values.{i}.{kv}": np.zeros((1, 2, 0, 32), np.float16) for i in range(6) for kv in ("key", "value")}}
    report = locate(folder / "model.onnx", feeds, faulty, "fp16")
    assert report.first["scope"] == "model.model.layers.2.mlp"
    assert all(row["relative"] < 2e-2 for row in report.rows[:7])  # everything before it agrees
    same = locate(folder / "model.onnx", feeds, lambda m, f, n: onnxruntime_outputs(m, f, n), "fp16")
    assert same.first is None
