"""The runtime refuses an artifact it cannot trust, naming the field or the file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from runtime import ArtifactError, load, read_manifest
from runtime.manifest import SCHEMA_VERSION, file_digest, write_manifest


@pytest.fixture
def artifact(tiny_artifacts, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_artifacts["dynamic"], copy)
    return copy


def edit_manifest(folder, change):
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_valid_artifact_loads(artifact):
    manifest = read_manifest(artifact)
    assert manifest.kv.layout == "dynamic" and len(manifest.kv.past_names) == 12
    assert manifest.graph.inputs[:3] == ("input_ids", "attention_mask", "position_ids")


def test_unknown_schema_version(artifact):
    edit_manifest(artifact, lambda m: m.update(schema_version=99))
    with pytest.raises(ArtifactError, match="schema_version 99 is not supported; this runtime reads schema_version 2"):
        read_manifest(artifact)


@pytest.mark.parametrize("path", [("graph",), ("precision", "dtype"), ("kv", "head_dim")])
def test_missing_field(artifact, path):
    def drop(m):
        section = m
        for key in path[:-1]:
            section = section[key]
        section.pop(path[-1])

    edit_manifest(artifact, drop)
    with pytest.raises(ArtifactError, match=f"manifest.json: {'.'.join(path)} is missing; export the artifact again"):
        read_manifest(artifact)


def test_tampered_file_is_named(artifact):
    data = bytearray((artifact / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (artifact / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model.onnx.data does not match its sha256"):
        read_manifest(artifact)


def test_truncated_file_is_named(artifact):
    path = artifact / "model.onnx.data"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"model.onnx.data has \d+ bytes but the manifest says"):
        load(artifact)


def test_missing_file_is_named(artifact):
    (artifact / "config.json").unlink()
    with pytest.raises(ArtifactError, match="config.json is listed in the manifest but missing"):
        read_manifest(artifact)


def test_half_written_artifact(artifact):
    (artifact / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json: the artifact is incomplete"):
        load(artifact)


def test_io_names_must_match_the_kv_description(artifact):
    edit_manifest(artifact, lambda m: m["kv"].update(num_layers=3))
    with pytest.raises(ArtifactError, match=r"kv.layers and kv.shapes must have an entry for each of the "
                                            r"kv.num_layers 3 layers that store KV, got \d+ and \d+"):
        read_manifest(artifact)
    edit_manifest(artifact, lambda m: m["kv"].update(num_layers=len(m["kv"]["layers"]) - 1,
                                                       layers=m["kv"]["layers"][1:], shapes=m["kv"]["shapes"][1:]))
    with pytest.raises(ArtifactError, match=r"kv.layers \[1, 2, 3, 4, 5\] and kv.shapes .* disagree with the model"):
        read_manifest(artifact)


def test_no_silent_cpu_fallback(artifact):
    from runtime.backends.onnxruntime_backend import ProviderError

    with pytest.raises(ProviderError, match="provider 'cuda' is not usable.*--allow-cpu-fallback"):
        load(artifact, provider="cuda")
    with pytest.raises(ProviderError, match="provider 'tensorrt' is not usable"):
        load(artifact, provider="tensorrt")
    assert load(artifact, provider="cuda", allow_cpu_fallback=True).backend.session.get_providers() == [
        "CPUExecutionProvider"
    ]


def test_io_names_must_match_the_presents(artifact):
    edit_manifest(artifact, lambda m: m["graph"].update(outputs=m["graph"]["outputs"][:-1]))
    with pytest.raises(ArtifactError, match=r"graph.outputs does not match kv \(6 layers.* got 12 names"):
        read_manifest(artifact)


@pytest.mark.parametrize(
    "section, field, value, message",
    [
        (None, "kind", "something-else", "kind 'something-else' is not supported; supported: gemma-deploy-artifact"),
        ("graph", "task", "translation", "graph.task 'translation' is not supported; supported: text-generation, "
                                         "feature-extraction"),
        ("model", "family", "llama", "model.family 'llama' is not supported; supported: gemma, gemma2, gemma3_text"),
        ("graph", "logits", "some", "graph.logits 'some' is not supported; supported: all, last"),
        ("precision", "dtype", "float8", "precision.dtype 'float8' is not supported; supported: fp32, fp16, bf16"),
        ("kv", "num_kv_heads", "2", "kv.num_kv_heads must be int, got '2'"),
        ("kv", "sliding_window_layers", 3, "kv.sliding_window_layers must be a list, got 3"),
    ],
)
def test_unknown_values_are_named(artifact, section, field, value, message):
    edit_manifest(artifact, lambda m: (m[section] if section else m).update({field: value}))
    with pytest.raises(ArtifactError, match=message):
        read_manifest(artifact)


def test_static_layout_needs_max_length(artifact):
    edit_manifest(artifact, lambda m: m["kv"].update(layout="static", max_length=None))
    with pytest.raises(ArtifactError, match="kv.max_length None must be a positive integer"):
        read_manifest(artifact)


def test_verify_false_skips_the_digest_but_not_the_size(artifact):
    path = artifact / "config.json"
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01  # same size, other content
    path.write_bytes(bytes(data))
    assert read_manifest(artifact, verify=False).graph.task == "text-generation"
    with pytest.raises(ArtifactError, match="config.json does not match its sha256"):
        read_manifest(artifact)


def test_graph_onnxruntime_cannot_load_is_a_load_error(artifact):
    manifest = read_manifest(artifact)
    (artifact / "model.onnx").write_bytes(b"not a protobuf")
    write_manifest(artifact, manifest)  # a consistent manifest over a broken graph
    with pytest.raises(ArtifactError, match="model.onnx cannot be loaded by onnxruntime"):
        load(artifact)


def test_write_manifest_lists_every_file_and_reads_back(tmp_path):
    """What the exporter writes is what the runtime accepts: nested files, sizes, streamed digests."""
    from runtime.manifest import Manifest
    from runtime.spec import ArtifactOptions, ModelSpec, resolve

    big = tmp_path / "model.onnx.data"
    big.write_bytes(os.urandom(3 * 2**20 + 17))  # spans several 1 MiB blocks
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "a.plan").write_bytes(b"plan")
    (tmp_path / "model.onnx").write_bytes(b"graph")
    model = ModelSpec(family="gemma3_text", hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=4, vocab_size=16, max_position_embeddings=64, sliding_window=8,
                      layer_types=("sliding_attention", "full_attention"))
    spec = resolve(ArtifactOptions(), model)
    written = write_manifest(tmp_path, Manifest(**vars(spec), source="test"))
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["kind"] == "gemma-deploy-artifact"
    assert sorted(written.files) == ["engines/a.plan", "model.onnx", "model.onnx.data"]
    assert data["files"]["model.onnx.data"] == {"sha256": hashlib.sha256(big.read_bytes()).hexdigest(),
                                                "size": big.stat().st_size}
    assert file_digest(big) == hashlib.sha256(big.read_bytes()).hexdigest()
    manifest = read_manifest(tmp_path)
    assert manifest == written  # every section reads back as it was written
    assert manifest.kv.num_layers == 2 and manifest.kv.sliding_window_layers == (0,)
    assert manifest.kv.present_names == [f"present.{i}.{t}" for i in range(2) for t in ("key", "value")]
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["kv"].update(shapes=[[1, 0]] + m["kv"]["shapes"][1:]), r"disagree with the model's layers"),
    (lambda m: m["model"].update(kv_shapes=[[1, 0]] * len(m["model"]["kv_shapes"]),
                                 ) or m["kv"].update(shapes=[[1, 0]] * len(m["kv"]["shapes"])), r"must be positive"),
    (lambda m: m["kv"].update(layers=list(reversed(m["kv"]["layers"]))), r"disagree with the model's layers"),
    (lambda m: m["model"].update(vocab_size=0), r"model.vocab_size must be positive"),
])
def test_a_kv_section_inconsistent_with_the_model_is_refused_with_one_line(artifact, edit, words):
    """Types alone passed these; the run then failed inside ONNX Runtime with a traceback (exit 1)."""
    from click.testing import CliRunner

    from runtime.cli import main

    edit_manifest(artifact, edit)
    with pytest.raises(ArtifactError, match=words):
        read_manifest(artifact, verify=False)
    result = CliRunner().invoke(main, ["generate", str(artifact), "hi"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1

