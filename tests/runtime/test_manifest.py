"""The runtime refuses an artifact it cannot trust, naming the field or the file."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime import ArtifactError, load, read_manifest


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
    assert manifest.kv_cache["layout"] == "dynamic" and len(manifest.past_names) == 12


def test_unknown_schema_version(artifact):
    edit_manifest(artifact, lambda m: m.update(schema_version=99))
    with pytest.raises(ArtifactError, match="schema_version 99 is not supported; this runtime reads schema_version 1"):
        read_manifest(artifact)


def test_missing_field(artifact):
    edit_manifest(artifact, lambda m: m.pop("io"))
    with pytest.raises(ArtifactError, match="required field 'io' is missing"):
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
    edit_manifest(artifact, lambda m: m["kv_cache"].update(num_layers=3))
    with pytest.raises(ArtifactError, match="past_key_values entries but kv_cache.num_layers is 3"):
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
