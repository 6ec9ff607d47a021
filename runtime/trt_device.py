"""TensorRT and the GPU it runs on: imports that fail with the fix, the device's identity, and which of an
artifact's engines this machine may load.

An engine is tied to the GPU model and the TensorRT version that built it (TensorRT developer guide,
"Engine compatibility": a plan is portable only across identical GPU models and the same TensorRT
version unless built version- or hardware-compatible, which we do not do). The manifest records both
for each engine; `select_engine` picks the one built here or refuses, naming what was built and what
this machine has.

Imports the standard library only; tensorrt and cuda-python are imported when called.

cuda-python's conventions (https://nvidia.github.io/cuda-python/cuda-bindings/latest/module/runtime.html): every
call returns a tuple, the cudaError_t first and the outputs after it, `(err,)` for a call with none; an output
is None when the call failed (cudaGetDeviceCount() -> (cudaErrorNoDevice, None)). cudaError_t is an int enum
(cudaSuccess == 0). cudaDeviceProp.name is bytes; .major and .minor are the compute capability.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class TensorRTUnavailable(RuntimeError):
    """TensorRT, its CUDA binding or a GPU is missing here: `reason`, then what to do about it."""

    def __init__(self, reason: str, fix: str = "install TensorRT on a machine with an NVIDIA GPU and driver: "
                                                 "pip install 'gemma-deploy[trt]'"):
        self.reason = reason
        super().__init__(f"{reason}; {fix}")


class EngineMismatch(RuntimeError):
    """No engine of the artifact was built for this GPU and TensorRT version."""


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # "NVIDIA L4"
    compute_capability: str  # "8.9"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:  # also the PyPI stub whose libnvinfer download failed
        raise TensorRTUnavailable(f"TensorRT is not installed or does not load here ({e})") from e
    return trt


def import_cudart():
    """cuda-python's runtime API: cuda.bindings.runtime since cuda-python 12.6.1, cuda.cudart before (a
    deprecated alias from 12.6.1, removed in 13.0; release notes of cuda-bindings 12.6.1 and 13.0.0)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise TensorRTUnavailable(f"cuda-python (TensorRT's CUDA binding) is not installed ({e})") from e
    return cudart


def check_cuda(result, call: str):
    """cuda-python returns (error, *values): raise on an error, return the values."""
    error, *values = result
    if int(error) != 0:
        raise RuntimeError(f"{call} failed with CUDA error {int(error)} ({error})")
    return values[0] if len(values) == 1 else tuple(values)


def native_handle(obj) -> int:
    """The address behind a cuda-python object (a cudaStream_t), for TensorRT's `stream_handle` arguments:
    cuda.bindings.utils.get_cuda_native_handle where it exists (int(obj) is deprecated since cuda-bindings
    12.9.1 and 13.0.0, "subject to future removal"), int(obj) in older releases."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def current_device(index: int = 0) -> DeviceInfo:
    """The GPU at `index`; TensorRTUnavailable when there is none or no driver."""
    cudart = import_cudart()
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0 or count <= index:
        raise TensorRTUnavailable(
            f"no NVIDIA GPU is visible (cudaGetDeviceCount: {error}, {count if int(error) == 0 else 0} devices)",
            "TensorRT engines are built and run on a machine with an NVIDIA GPU and driver",
        )
    prop = check_cuda(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}")


def engine_file_name(device: DeviceInfo, tensorrt_version: str) -> str:
    return f"{device.slug}-sm{device.compute_capability.replace('.', '')}-trt{tensorrt_version}.plan"


def select_engine(engines, device: DeviceInfo, tensorrt_version: str):
    """The manifest's Engine built for `device` with `tensorrt_version`, or EngineMismatch."""
    if not engines:
        raise EngineMismatch(
            "this artifact has no TensorRT engine yet; build it on this machine with gemma-export --resume-build DIR "
            "(or run the ONNX graph with ONNX Runtime: backend='onnxruntime', gemma-run --backend onnxruntime)"
        )
    for entry in engines:
        if (entry.gpu == device.name and entry.compute_capability == device.compute_capability
                and entry.tensorrt_version == tensorrt_version):
            return entry
    built = "; ".join(f"{e.file}: {e.gpu} (compute capability {e.compute_capability}), TensorRT {e.tensorrt_version}"
                      for e in engines)
    raise EngineMismatch(
        f"no engine of this artifact was built for this machine's {device.name} (compute capability "
        f"{device.compute_capability}) with TensorRT {tensorrt_version}; it has {built}. A TensorRT engine runs only "
        "on the GPU model and TensorRT version that built it: build one here with gemma-export --resume-build DIR"
    )
