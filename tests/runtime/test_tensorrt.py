"""The TensorRT backend as far as this machine goes: which engine a machine may load (and the refusal
that names both sides), and no silent switch to ONNX Runtime when TensorRT is asked for or expected.
The engine itself runs in tests/exporter/test_trt_gpu.py (marked gpu)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from runtime import load
from runtime.cli import EXIT_NO_TENSORRT, main
from runtime.manifest import MANIFEST_NAME, write_manifest
from runtime.trt_device import DeviceInfo, EngineMismatch, TensorRTUnavailable, engine_file_name, select_engine

L4 = DeviceInfo("NVIDIA L4", "8.9")
A100 = DeviceInfo("NVIDIA A100-SXM4-80GB", "8.0")


def _entry(device: DeviceInfo, version: str) -> dict:
    return {"file": f"engines/{engine_file_name(device, version)}", "gpu": device.name,
            "compute_capability": device.compute_capability, "tensorrt_version": version}


def test_engine_file_name_names_gpu_capability_and_version():
    assert engine_file_name(A100, "10.13.3.9") == "nvidia-a100-sxm4-80gb-sm80-trt10.13.3.9.plan"


def test_select_engine_takes_the_one_built_here():
    engines = [_entry(A100, "10.13.3.9"), _entry(L4, "10.13.3.9"), _entry(L4, "10.9.0.34")]
    assert select_engine(engines, L4, "10.9.0.34") is engines[2]
    assert select_engine(engines, L4, "10.13.3.9") is engines[1]


@pytest.mark.parametrize("device, version", [(DeviceInfo("NVIDIA H100 80GB HBM3", "9.0"), "10.13.3.9"),
                                             (L4, "10.14.1.48")])
def test_select_engine_refuses_another_gpu_or_version_naming_both(device, version):
    engines = [_entry(A100, "10.13.3.9"), _entry(L4, "10.13.3.9")]
    with pytest.raises(EngineMismatch) as error:
        select_engine(engines, device, version)
    message = str(error.value)
    assert device.name in message and f"TensorRT {version}" in message  # this machine
    assert "NVIDIA A100-SXM4-80GB (compute capability 8.0), TensorRT 10.13.3.9" in message  # what was built
    assert "--resume-build" in message


def test_select_engine_without_engines_says_how_to_build_one():
    with pytest.raises(EngineMismatch, match="no TensorRT engine yet.*--resume-build.*onnxruntime"):
        select_engine([], L4, "10.13.3.9")


@pytest.fixture()
def artifact_with_engine(tiny_artifacts, tmp_path):
    """A copy of a tiny artifact whose manifest lists an engine (built elsewhere)."""
    folder = tmp_path / "with-engine"
    shutil.copytree(tiny_artifacts["dynamic"], folder)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    entry = _entry(L4, "10.13.3.9")
    (folder / "engines").mkdir()
    (folder / entry["file"]).write_bytes(b"not a real engine")
    data["trt"] = {"plan": {"limits": {"max_batch_size": 1, "max_input_len": 16, "max_length": 64}},
                   "engines": [entry]}
    write_manifest(folder, {k: v for k, v in data.items() if k not in ("schema_version", "kind", "files")})
    return folder


def test_an_artifact_with_an_engine_never_falls_back_to_onnxruntime(artifact_with_engine):
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        load(artifact_with_engine)  # auto: the engine, or an error
    model = load(artifact_with_engine, backend="onnxruntime")  # the ONNX graph, when asked for
    assert model.backend.provider == "cpu"


def test_gemma_run_tensorrt_backend_without_tensorrt_exits_3(tiny_artifacts):
    result = CliRunner().invoke(main, ["generate", str(tiny_artifacts["dynamic"]), "hello", "--backend", "tensorrt"])
    assert result.exit_code == EXIT_NO_TENSORRT, result.output
    assert "pip install 'gemma-deploy[trt]'" in result.output and "--backend onnxruntime" in result.output


def test_unknown_backend_is_refused(tiny_artifacts):
    with pytest.raises(ValueError, match="backend 'tensorrtt' is not supported; supported: auto, onnxruntime"):
        load(tiny_artifacts["dynamic"], backend="tensorrtt")
