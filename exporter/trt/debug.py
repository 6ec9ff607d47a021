"""A debug engine for divergence.locate: the marked graph (layer outputs added) built with the artifact's
own plan, run once on the prefill feeds. GPU only.

The layer outputs are marked in the ONNX graph (divergence.marked_copy appends them to graph.output), and
TensorRT's ONNX parser marks every graph output as a network output, which keeps it from being fused away:
the same effect as Polygraphy's `--trt-outputs NAME...` (backend/trt/loader.py ModifyNetworkOutputs ->
backend/trt/util.py mark_outputs, which calls network.mark_output(tensor) after parsing), without touching the
network. The marked outputs change fusion around them, so the debug engine locates a divergence; it does not
time anything."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from runtime.trt_device import check_cuda, current_device, import_cudart, import_tensorrt, native_handle

from .build import build_engine


def engine_runner(manifest):
    """`run(marked_graph, feeds, names) -> {name: array}` for divergence.locate, on this GPU."""

    def run(marked: Path, feeds: dict, names: list[str]) -> dict:
        with tempfile.TemporaryDirectory(prefix="gemma-debug-engine-") as scratch:
            result = build_engine(marked, manifest.trt, manifest.plan, Path(scratch) / "debug.plan", progress=False)
            return run_engine_once(result.engine, feeds, names)

    return run


def run_engine_once(engine_path, feeds: dict[str, np.ndarray], names: list[str], profile: int = 0) -> dict:
    """Run a serialized engine once on host `feeds` and return the named outputs as float32 arrays (a
    debugging path: buffers are allocated for this call and freed after it)."""
    trt, cudart = import_tensorrt(), import_cudart()
    current_device()
    logger = trt.Logger(trt.Logger.WARNING)
    with open(engine_path, "rb") as f:
        engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
    if engine is None:
        raise RuntimeError(f"TensorRT {trt.__version__} cannot deserialize {engine_path} (its log above says why)")
    context = engine.create_execution_context()
    stream = check_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
    context.set_optimization_profile_async(profile, native_handle(stream))
    pointers = []

    def malloc(size):
        pointers.append(int(check_cuda(cudart.cudaMalloc(max(size, 1)), "cudaMalloc")))
        return pointers[-1]

    try:
        for name, value in feeds.items():
            value = np.ascontiguousarray(value)
            pointer = malloc(value.nbytes)
            check_cuda(cudart.cudaMemcpy(pointer, value.ctypes.data, value.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy")
            if not (context.set_input_shape(name, value.shape) and context.set_tensor_address(name, pointer)):
                raise RuntimeError(f"the TensorRT engine refused input {name} of shape {value.shape} "
                                   f"in profile {profile}")
        outputs = {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            shape = tuple(context.get_tensor_shape(name))
            # trt.nptype maps float32/float16/int8/int32/int64/bool/uint8 and raises TypeError for bfloat16 and
            # the fp8/int4 types, which numpy lacks: bfloat16 is read as its raw 16 bits
            bf16 = engine.get_tensor_dtype(name) == trt.bfloat16
            dtype = np.dtype(np.uint16 if bf16 else trt.nptype(engine.get_tensor_dtype(name)))
            size = int(np.prod(shape)) * dtype.itemsize
            outputs[name] = (shape, dtype, bf16, malloc(size))
            context.set_tensor_address(name, outputs[name][3])
        if not context.execute_async_v3(native_handle(stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (its log above says why)")
        check_cuda(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        result = {}
        for name in names:
            shape, dtype, bf16, pointer = outputs[name]
            host = np.empty(shape, dtype)
            check_cuda(cudart.cudaMemcpy(host.ctypes.data, pointer, host.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy")
            # bfloat16 is the top half of a float32
            result[name] = (host.astype(np.uint32) << 16).view(np.float32) if bf16 else host.astype(np.float32)
        return result
    finally:
        for pointer in pointers:
            cudart.cudaFree(pointer)
        cudart.cudaStreamDestroy(stream)
