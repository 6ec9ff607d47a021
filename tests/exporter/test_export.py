"""gemma-export: traced graphs against PyTorch, the artifact contract, interrupted exports, gemma-parity."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from exporter import ExportOptions, export
from exporter.cli import export_command, parity_command
from runtime.kv import positions
from runtime.tokenizer import left_pad
from tests.families import ALL, FAMILY_OF


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "tiny-gemma4-moe" else n for n in ALL])
def test_tiny_export_matches_pytorch(tmp_path, name, kv_cache):  # the MoE graph's default-run export: test_quantize.py
    """Batch of three left-padded prompts, prefill + 8 decode steps, past the window of 8."""
    options = ExportOptions(kv_cache=kv_cache, max_length=48 if kv_cache == "static" else None, progress=False)
    manifest = export(f"random:{name}", tmp_path / "a", options)
    parity = json.loads((tmp_path / "a" / "parity.json").read_text())
    assert parity["passed"] and parity["batch_size"] == 3 and parity["new_tokens"] == 8
    # Gemma 4 scales q.k by 1.0 on unit-RMS q and k: scores up to head_dim wide, where float32's rounding of them
    # moves the softmax 10x more than in Gemma 1-3 (models/ against transformers differs as much); verify's float32
    # tolerance still holds it.
    assert parity["max_abs_diff"] <= (1e-3 if FAMILY_OF[name] == "gemma4_text" else 1e-4)
    assert parity["greedy_agreement"] == 1.0
    assert manifest.kv.layout == kv_cache
    assert manifest.model.family == FAMILY_OF[name]


def test_graph_io_names_dtypes_and_dims(tmp_path):
    export("random:tiny-gemma3", tmp_path / "a", ExportOptions(verify=False, progress=False))
    model = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: v for v in model.graph.input}
    outputs = {v.name: v for v in model.graph.output}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert dims(inputs["input_ids"]) == ["batch_size", "sequence_length"]
    assert dims(inputs["attention_mask"]) == ["batch_size", "total_sequence_length"]
    assert dims(inputs["past_key_values.5.value"]) == ["batch_size", 2, "past_sequence_length", 32]
    assert dims(outputs["present.0.key"]) == ["batch_size", 2, "total_sequence_length", 32]
    assert dims(outputs["logits"]) == ["batch_size", "sequence_length", 512]
    assert inputs["input_ids"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert outputs["logits"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert len(inputs) == 3 + 2 * 6 and len(outputs) == 1 + 2 * 6


def test_last_logits_only(tmp_path):
    import onnxruntime as ort

    export("random:tiny-gemma-2b", tmp_path / "a", ExportOptions(logits="last", progress=False))
    session = ort.InferenceSession(str(tmp_path / "a" / "model.onnx"))
    ids, mask = left_pad([[2, 5, 6, 7], [2, 9]], 0)
    empty = np.zeros((2, 1, 0, 32), np.float32)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
    feeds.update({f"past_key_values.{i}.{kv}": empty for i in range(2) for kv in ("key", "value")})
    assert session.run(["logits"], feeds)[0].shape == (2, 1, 512)


def test_a_static_graph_returns_the_trailing_positions_it_is_asked_for(tmp_path):
    """--logits last, static layout: num_logits_to_keep K gives the last K positions' logits of a run over a cache,
    equal to a --logits all graph's (on Gemma 4, whose KV-shared layers compute those K alone; Gemma 3's graphs are
    the speculative decoding tests' in tests/runtime/test_scheduler.py); older manifests without the input still
    load."""
    name = "tiny-gemma4"
    import onnxruntime as ort

    from runtime.manifest import read_manifest

    options = dict(kv_cache="static", max_length=32, verify=False, progress=False)
    last = export(f"random:{name}", tmp_path / "last", ExportOptions(logits="last", **options))
    export(f"random:{name}", tmp_path / "all", ExportOptions(logits="all", **options))
    assert last.graph.inputs[-1] == "num_logits_to_keep" and last.graph.keeps_logits
    sessions = {k: ort.InferenceSession(str(tmp_path / k / "model.onnx")) for k in ("last", "all")}
    past = {i.name: np.zeros([2 if d == "batch_size" else d for d in i.shape], np.float32)
            for i in sessions["all"].get_inputs() if i.name.startswith("past_key_values")}
    ids = np.array([[2, 5, 6, 7, 8, 9], [2, 9, 4, 3, 8, 7]])  # a prefill from slot 0, as runtime/kv.py feeds it
    feeds = {"input_ids": ids, "position_ids": np.arange(6)[None].repeat(2, 0), "attention_mask": np.ones_like(ids),
             **past}
    every = sessions["all"].run(["logits"], feeds)[0]
    for keep in (1, 4, 6):
        kept = sessions["last"].run(["logits"], {**feeds, "num_logits_to_keep": np.array(keep, np.int64)})[0]
        np.testing.assert_allclose(kept, every[:, -keep:], atol=1e-5)
    manifest = json.loads((tmp_path / "last" / "manifest.json").read_text())
    manifest["graph"]["inputs"].remove("num_logits_to_keep")  # as an artifact from before the input
    (tmp_path / "last" / "manifest.json").write_text(json.dumps(manifest))
    assert not read_manifest(tmp_path / "last", verify=False).graph.keeps_logits


@pytest.mark.parametrize("task", ["feature-extraction", "sequence-classification", "token-classification"])
def test_other_heads(tmp_path, task):
    manifest = export("random:tiny-gemma-2b", tmp_path / "a", ExportOptions(task=task, progress=False))
    assert manifest.graph.task == task and manifest.parity.passed
    assert manifest.parity.max_abs_diff <= 1e-4
    assert not any(name.startswith("past_key_values") for name in manifest.graph.inputs) and manifest.kv is None


@pytest.mark.parametrize("task,dtype", [("sequence-classification", "fp16"), ("feature-extraction", "bf16")])
def test_other_heads_in_half_precision(tmp_path, task, dtype):
    manifest = export("random:tiny-gemma3", tmp_path / "a", ExportOptions(task=task, dtype=dtype, progress=False))
    assert manifest.parity.passed and manifest.precision.dtype == dtype


def test_manifest_lists_every_file_with_sha256(tmp_path):
    import hashlib

    manifest = export("random:tiny-gemma3", tmp_path / "a", ExportOptions(progress=False))
    folder = tmp_path / "a"
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    assert sorted(manifest.files) == on_disk
    for name, entry in manifest.files.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry.sha256
    written = json.loads((folder / "manifest.json").read_text())
    assert written["schema_version"] == 2 and written["parity"]["passed"] and manifest.parity.passed
    assert manifest.kv.sliding_window_layers == (0, 1, 2, 3, 4) == tuple(written["kv"]["sliding_window_layers"])


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "a").mkdir()
    result = CliRunner().invoke(export_command, ["--model", "random:tiny-gemma-2b", "--output", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "already exists; pass --overwrite" in result.output


def test_unsupported_and_missing_models_exit_2(tmp_path):
    result = CliRunner().invoke(export_command, ["--model", str(tmp_path / "none.gguf"), "--output", str(tmp_path / "a")])
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = CliRunner().invoke(export_command, ["--model", str(tmp_path / "llama"), "--output", str(tmp_path / "a")])
    assert result.exit_code == 2 and "model_type 'llama' is not supported" in result.output
    assert not (tmp_path / "a").exists()


def test_gemma_export_prints_its_own_lines_only(tmp_path):
    """gemma-export's output is its progress, results and warnings: none of torch's own notices (the exporter's
    axis-name UserWarnings, a pytree FutureWarning, torchvision's operators it skips)."""
    command = [sys.executable, "-c", "from exporter.cli import export_command; export_command()", "--model",
               "random:tiny-gemma-2b", "--output", str(tmp_path / "a"), "-q", "--no-verify"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    # Python's warnings (".../file.py:N: UserWarning: ...", the source line after), torch's log lines ("W1206 ...")
    foreign = [line for line in lines if re.search(r"Warning:|site-packages|^\s|^[WIE]\d{4} ", line)]
    assert not foreign, foreign
    assert any(line.startswith("exported random:tiny-gemma-2b") for line in lines)


def test_interrupted_export_leaves_no_artifact(tmp_path):
    output = tmp_path / "a"
    command = [sys.executable, "-c", "from exporter.cli import export_command; export_command()", "--model", "random:tiny-gemma3", "--output", str(output), "-q"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    partial = []
    while time.time() < deadline and not partial:
        partial = list(tmp_path.glob(".a.partial-*"))
        time.sleep(0.2)
    assert partial, "the export never started writing"
    time.sleep(1.0)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not output.exists()
    # The next export succeeds and removes what the killed one left.
    export("random:tiny-gemma3", output, ExportOptions(verify=False, progress=False))
    assert (output / "manifest.json").is_file()
    assert not list(tmp_path.glob(".a.partial-*"))


def test_failed_parity_writes_nothing(tmp_path, monkeypatch):
    from exporter import ParityError, verify

    monkeypatch.setitem(verify.TOLERANCES, "fp32", 1e-12)
    with pytest.raises(ParityError, match="parity failed"):
        export("random:tiny-gemma-2b", tmp_path / "a", ExportOptions(progress=False))
    assert not (tmp_path / "a").exists()
    result = CliRunner().invoke(export_command, ["--model", "random:tiny-gemma-2b", "--output", str(tmp_path / "a")])
    assert result.exit_code == 1 and "no artifact was written" in result.output


def test_gemma_parity_exit_codes(tmp_path):
    export("random:tiny-gemma2", tmp_path / "a", ExportOptions(verify=False, progress=False))
    runner = CliRunner()
    ok = runner.invoke(parity_command, [str(tmp_path / "a"), "--model", "random:tiny-gemma2", "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.output)
    assert report["passed"] and report["max_abs_diff"] <= 1e-4
    strict = runner.invoke(parity_command, [str(tmp_path / "a"), "--model", "random:tiny-gemma2", "--tolerance", "1e-12"])
    assert strict.exit_code == 1 and strict.output.startswith("FAIL")
    other = runner.invoke(parity_command, [str(tmp_path / "a"), "--model", "random:tiny-gemma3"])
    assert other.exit_code == 2 and "does not match" in other.output
    missing = runner.invoke(parity_command, [str(tmp_path / "nothing"), "--model", "random:tiny-gemma2"])
    assert missing.exit_code == 2


@pytest.mark.slow  # an E2B-shaped export (8.6 GiB of fp16 weights); time and peak RSS: scripts/bench_export.py
def test_gemma4_e2b_shaped_export(tmp_path):
    """random:gemma-4-e2b in float16, unverified (its float32 reference alone would take 17 GiB; the tiny configs
    carry the parity): past and present for the 15 storing layers of 35, each global one [B, 1, P, 512], each local
    one [B, 1, P, 256], the per-layer table [262144, 35 x 256] in the graph, the artifact the size of the weights."""
    from models import presets

    config = presets.config("gemma-4-e2b")
    manifest = export("random:gemma-4-e2b", tmp_path / "a", ExportOptions(dtype="fp16", verify=False, progress=False))
    kv = manifest.kv
    assert kv.layers == tuple(range(15)) and manifest.model.kv_sources == tuple(config.kv_source)
    graph = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert [n for n in inputs if n.startswith("past_key_values.")] == kv.past_names and len(kv.past_names) == 30
    assert inputs["past_key_values.4.key"] == ["batch_size", 1, "past_sequence_length", 512]
    assert inputs["past_key_values.3.value"] == ["batch_size", 1, "past_sequence_length", 256]
    table = next(i for i in graph.initializer if i.name.endswith("embed_tokens_per_layer.weight"))
    assert list(table.dims) == [262144, 35 * 256]
    size = sum(f.size for f in manifest.files.values())
    assert manifest.export.weight_bytes <= size <= 1.01 * manifest.export.weight_bytes + 2**20
