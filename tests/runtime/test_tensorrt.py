"""The TensorRT backend as far as this machine goes: which engine a machine may load (and the refusal
that names both sides), and no silent switch to ONNX Runtime when TensorRT is asked for or expected.
The engine itself runs in tests/exporter/test_trt_gpu.py (marked gpu)."""

from __future__ import annotations

import dataclasses
import enum
import shutil
import types

import pytest
from click.testing import CliRunner

import runtime.trt_device as trt_device
from runtime import load
from runtime.cli import main
from runtime.exit_codes import NO_TENSORRT
from runtime.manifest import Engine, read_manifest, write_manifest
from runtime.spec import BuildLimits, TrtSpec
from runtime.trt_device import (DeviceInfo, EngineMismatch, TensorRTUnavailable, check_cuda, current_device,
                                engine_file_name, select_engine)

L4 = DeviceInfo("NVIDIA L4", "8.9")
A100 = DeviceInfo("NVIDIA A100-SXM4-80GB", "8.0")


def _entry(device: DeviceInfo, version: str) -> Engine:
    return Engine(file=f"engines/{engine_file_name(device, version)}", gpu=device.name,
                  compute_capability=device.compute_capability, tensorrt_version=version, profiles=("prefill",),
                  build_seconds=1.0)


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
    entry = _entry(L4, "10.13.3.9")
    (folder / "engines").mkdir()
    (folder / entry.file).write_bytes(b"not a real engine")
    manifest = read_manifest(folder)
    write_manifest(folder, dataclasses.replace(manifest, trt=TrtSpec(BuildLimits(1, 16, 64), 3), engines=(entry,)))
    return folder


def test_an_artifact_with_an_engine_never_falls_back_to_onnxruntime(artifact_with_engine):
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        load(artifact_with_engine)  # auto: the engine, or an error
    model = load(artifact_with_engine, backend="onnxruntime")  # the ONNX graph, when asked for
    assert model.backend.provider == "cpu"


def test_gemma_run_tensorrt_backend_without_tensorrt_exits_3(tiny_artifacts):
    result = CliRunner().invoke(main, ["generate", str(tiny_artifacts["dynamic"]), "hello", "--backend", "tensorrt"])
    assert result.exit_code == NO_TENSORRT, result.output
    assert "pip install 'gemma-deploy[trt]'" in result.output and "--backend onnxruntime" in result.output


def test_unknown_backend_is_refused(tiny_artifacts):
    with pytest.raises(ValueError, match="backend 'tensorrtt' is not supported; expected one of auto, onnxruntime"):
        load(tiny_artifacts["dynamic"], backend="tensorrtt")


# -- cuda-python's and TensorRT's calling conventions, with stand-ins (the real ones need a GPU) -------------


class CudaError(enum.IntEnum):  # cuda.bindings.runtime.cudaError_t is an int enum
    cudaSuccess = 0
    cudaErrorNoDevice = 100


def test_check_cuda_unpacks_cuda_python_result_tuples():
    assert check_cuda((CudaError.cudaSuccess,), "cudaSetDevice") == ()  # a call without outputs
    assert check_cuda((CudaError.cudaSuccess, 140000), "cudaMalloc") == 140000
    with pytest.raises(RuntimeError, match="cudaMalloc failed with CUDA error 100"):
        check_cuda((CudaError.cudaErrorNoDevice, None), "cudaMalloc")  # outputs are None on failure


def _fake_cudart(count, name=b"NVIDIA L4", major=8, minor=9):
    error = CudaError.cudaSuccess if count else CudaError.cudaErrorNoDevice
    props = types.SimpleNamespace(name=name, major=major, minor=minor)
    return types.SimpleNamespace(cudaGetDeviceCount=lambda: (error, count if count else None),
                                 cudaGetDeviceProperties=lambda index: (CudaError.cudaSuccess, props))


def test_current_device_reads_name_bytes_and_compute_capability(monkeypatch):
    monkeypatch.setattr(trt_device, "import_cudart", lambda: _fake_cudart(1, b"NVIDIA L4\x00\x00"))
    assert current_device() == L4


def test_current_device_without_a_gpu_is_unavailable(monkeypatch):
    monkeypatch.setattr(trt_device, "import_cudart", lambda: _fake_cudart(0))
    with pytest.raises(TensorRTUnavailable, match="no NVIDIA GPU is visible"):
        current_device()


def test_progress_bar_counts_trt_steps_from_zero():
    from exporter.trt.build import _progress_monitor

    class IProgressMonitor:  # trt.IProgressMonitor: its __init__ must be called by a subclass
        def __init__(self):
            self.initialized = True

    monitor = _progress_monitor(types.SimpleNamespace(IProgressMonitor=IProgressMonitor))
    assert monitor.initialized
    monitor.phase_start("Building", None, 3)
    monitor.phase_start("Tactics", "Building", 5)  # nested: no bar of its own
    assert monitor.step_complete("Tactics", 0) is True
    for step in range(3):  # TensorRT reports the step just finished, in [0, num_steps)
        assert monitor.step_complete("Building", step) is True
    assert monitor.bars["Building"].n == 3
    monitor.phase_finish("Tactics")
    monitor.phase_finish("Building")
    assert not monitor.bars


class _FakeConfig:
    """IBuilderConfig's timing-cache calls: create_timing_cache(bytes) -> cache or None, set_timing_cache -> bool."""

    def __init__(self, accepts):
        self.accepts, self.attached = accepts, []

    def create_timing_cache(self, blob):
        return None if blob == b"garbage" else ("cache", bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch):
        ok = self.accepts or cache == ("cache", b"")
        if ok:
            self.attached.append(cache)
        return ok


@pytest.mark.parametrize("blob, accepts, attached", [(None, True, b""), (b"saved", True, b"saved"),
                                                     (b"saved", False, b""), (b"garbage", True, b"")])
def test_a_timing_cache_tensorrt_refuses_is_replaced_by_an_empty_one(tmp_path, blob, accepts, attached):
    from exporter.trt.build import _use_timing_cache

    path = tmp_path / "timing.cache"
    if blob is not None:
        path.write_bytes(blob)
    config = _FakeConfig(accepts)
    _use_timing_cache(config, path)
    assert config.attached == [("cache", attached)]
