"""TensorRT backend: the artifact's engine for this GPU, device buffers allocated once, the KV cache bound
in place from step to step, one CUDA stream.

    engine  engines/<gpu>-sm<cc>-trt<version>.plan, chosen by runtime.trt_device.select_engine (an engine
            built for another GPU or TensorRT version is refused, naming both)
    profiles one execution context per optimization profile (0: prefill, 1: decode; exporter/trt/plan.py);
            each call takes the first profile whose [min, max] box holds its shapes: a prompt longer
            than --max-input-len is fed in chunks
    buffers  input ids, mask and positions at their maximum sizes; the logits; two sets of KV buffers of
            [max_batch, kv_heads, max_length, head_dim] (one when past and present share it).
            dynamic layout: past [B, H, P, D] is read from one set and present [B, H, P + S, D] written to
            the other, both contiguous, so the next step binds the other set as its past: the sets swap,
            nothing is copied. static layout: [B, H, L, D] in both, swapped the same way.

Per step: set the input shapes, copy ids, mask and positions to the device, bind addresses, enqueue
(execute_async_v3), copy back the last position's logits, synchronize. The calls are TensorRT 10's
(https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html,
.../infer/Core/ExecutionContext.html, .../infer/Core/Runtime.html; the bindings: python/src/infer/pyCore.cpp of
https://github.com/NVIDIA/TensorRT; Polygraphy's backend/trt/runner.py makes the same calls):
    trt.Runtime(logger).deserialize_cuda_engine(bytes)   ICudaEngine, or None (the engine keeps its runtime alive)
    engine.create_execution_context()                    a context on profile 0; "Select an optimization profile
        ... with async semantics": context.set_optimization_profile_async(index, stream_handle) raises on a bad
        index, before any set_input_shape (NvInferRuntime.h, setOptimizationProfileAsync)
    engine.get_tensor_profile_shape(name, profile)       [min, opt, max] Dims of an input in a profile
    context.set_input_shape(name, shape) -> bool, context.set_tensor_address(name, int) -> bool (256-byte aligned:
        cudaMalloc's are), context.execute_async_v3(stream_handle: int) -> bool, context.get_tensor_shape(name)
and cuda-python's runtime API (https://nvidia.github.io/cuda-python/cuda-bindings/latest/module/runtime.html):
cudaMalloc(size) -> (err, int), cudaMemcpyAsync(dst, src, count, kind, stream), cudaMemcpy2DAsync(dst, dpitch, src,
spitch, width, height, kind, stream), cudaMemsetAsync(ptr, value, count, stream), cudaStreamCreate() -> (err,
cudaStream_t); pointers are plain ints, the stream a cudaStream_t (runtime.trt_device.native_handle gives TensorRT
its address). Host buffers are pageable numpy arrays: cudaMemcpyAsync from pageable memory returns once the data
is staged, and into it once the copy is done, so they stay valid (CUDA runtime API, "API synchronization behavior").

Runs only where TensorRT and an NVIDIA GPU are; tests/runtime/test_tensorrt.py covers the rest (engine
selection, limits) here and marks the GPU part `gpu`.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..manifest import ArtifactError, Manifest
from ..spec import ITEMSIZE
from ..trt_device import check_cuda, current_device, import_cudart, import_tensorrt, native_handle, select_engine
from .base import Backend

log = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask", "position_ids")


class TensorRTBackend(Backend):
    provider = "tensorrt"

    def __init__(self, manifest: Manifest, device_index: int = 0):
        trt = import_tensorrt()
        self.cudart = cudart = import_cudart()
        device = current_device(device_index)
        entry = select_engine(manifest.engines, device, trt.__version__)
        limits = manifest.trt.limits
        super().__init__(manifest)
        kv = manifest.kv
        check_cuda(cudart.cudaSetDevice(device_index), "cudaSetDevice")

        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(manifest.path(entry.file).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT {trt.__version__} cannot deserialize {entry.file}; build it again "
                                "with gemma-export --resume-build DIR")
        self.stream = check_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = native_handle(self.stream)
        # One context per profile: a context may use one profile at a time, and each switch costs a resource
        # update on the next enqueue; the profile is selected on the stream every step is enqueued on.
        self.contexts = []
        for index in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context()
            if context is None:
                raise RuntimeError(f"TensorRT could not create an execution context for profile {index} "
                                   "(out of GPU memory? its log above says why)")
            context.set_optimization_profile_async(index, self.stream_handle)
            self.contexts.append(context)

        self.max_batch_size = limits.max_batch_size
        self.max_length = kv.max_length if kv.layout == "static" else limits.max_length
        self.kv_heads, self.head_dim = kv.num_kv_heads, kv.head_dim
        self.kv_itemsize = ITEMSIZE[kv.dtype]
        self.vocab_size = manifest.model.vocab_size
        self.max_rows = limits.max_input_len if self.logits_all else 1

        self._buffers: list[int] = []
        B, L = self.max_batch_size, self.max_length
        self.inputs = {name: self._malloc(B * L * 8) for name in INPUTS}
        self.logits = self._malloc(B * self.max_rows * self.vocab_size * 4)
        self.kv_bytes = B * self.kv_heads * L * self.head_dim * self.kv_itemsize
        sets = 1 if self.shares_buffers else 2
        self.kv = [[self._malloc(self.kv_bytes) for _ in self.past_names] for _ in range(sets)]
        self._current = 0
        log.info("TensorRT engine %s on %s: %d profiles, %.2f GiB of KV buffers", entry.file, device.name,
                 len(self.contexts), sets * len(self.past_names) * self.kv_bytes / 2**30)

    def _malloc(self, size: int) -> int:
        pointer = check_cuda(self.cudart.cudaMalloc(max(size, 1)), "cudaMalloc")
        self._buffers.append(int(pointer))
        return int(pointer)

    def __del__(self):
        for pointer in getattr(self, "_buffers", []):
            self.cudart.cudaFree(pointer)
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamDestroy(self.stream)

    # -- the cache -----------------------------------------------------------------------------------

    def _reset(self, batch_size: int) -> None:
        if self.kv_layout == "static":  # unused slots are masked, but NaN garbage times a zero weight is NaN
            for buffers in self.kv:
                for pointer in buffers:
                    check_cuda(self.cudart.cudaMemsetAsync(pointer, 0, self.kv_bytes, self.stream), "cudaMemsetAsync")

    def _trim(self, length: int) -> None:
        if self.kv_layout == "dynamic" and length > 0 and len(self.kv) == 2:
            # [B, H, P, D] -> [B, H, length, D]: B * H rows of length * D items, into the other set.
            row = self.head_dim * self.kv_itemsize
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            for src, dst in zip(self.kv[self._current], self.kv[1 - self._current]):
                check_cuda(self.cudart.cudaMemcpy2DAsync(dst, length * row, src, self._past_length * row, length * row,
                                                         self.batch_size * self.kv_heads, kind, self.stream),
                           "cudaMemcpy2DAsync")
            self._current = 1 - self._current

    # -- a step --------------------------------------------------------------------------------------

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                all_logits: bool = False) -> np.ndarray:
        self.check_logits(all_logits)
        B, S = input_ids.shape
        pieces, start = [], 0
        while start < S:
            index, size = self._profile_for(B, S - start)
            past = self._past_length
            mask = attention_mask[:, : past + size]
            pieces.append(self._run(index, input_ids[:, start:start + size], mask,
                                    position_ids[:, start:start + size], all_logits))
            start += size
        return np.concatenate(pieces, axis=1) if all_logits else pieces[-1]

    def _profile_for(self, batch: int, remaining: int) -> tuple[int, int]:
        """The first profile that takes `batch` rows and some of the remaining tokens over the cache, and
        how many tokens it takes (as many as its box allows)."""
        order = list(range(len(self.contexts)))
        if remaining == 1:
            order.reverse()  # a decode step: the decode profile's kernels were tuned for it
        for index in order:
            low, _, high = self.engine.get_tensor_profile_shape("input_ids", index)
            size = min(remaining, high[1])
            shapes = self._shapes(batch, size)
            if all(self._within(name, shape, index) for name, shape in shapes.items()):
                return index, size
        raise ValueError(
            f"no optimization profile of this engine takes {remaining} new tokens for {batch} rows over a cache of "
            f"{self._past_length} (limits: {self.max_batch_size} rows, {self.max_length} tokens); export and build "
            "again with larger --max-batch-size / --max-input-len / --max-length"
        )

    def _within(self, name: str, shape: tuple[int, ...], index: int) -> bool:
        low, _, high = self.engine.get_tensor_profile_shape(name, index)
        return all(lo <= s <= hi for s, lo, hi in zip(shape, low, high))

    def _shapes(self, batch: int, size: int) -> dict[str, tuple[int, ...]]:
        past = self._past_length
        slots = self.max_length if self.kv_layout == "static" else past
        kv = (batch, self.kv_heads, slots, self.head_dim)
        return {"input_ids": (batch, size), "attention_mask": (batch, past + size), "position_ids": (batch, size),
                **{name: kv for name in self.past_names}}

    def _run(self, index: int, ids, mask, positions, all_logits: bool) -> np.ndarray:
        cudart, context = self.cudart, self.contexts[index]
        B, S = ids.shape
        for name, shape in self._shapes(B, S).items():
            if not context.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT refused the shape {shape} of {name} in optimization profile {index} "
                                   "(its log above says why)")
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        host = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        host = {name: np.ascontiguousarray(value, dtype=np.int64) for name, value in host.items()}
        for name, value in host.items():
            check_cuda(cudart.cudaMemcpyAsync(self.inputs[name], value.ctypes.data, value.nbytes, to_device,
                                              self.stream), "cudaMemcpyAsync")
        past_set = self.kv[self._current]
        present_set = self.kv[(self._current + 1) % len(self.kv)]
        addresses = {**self.inputs, **dict(zip(self.past_names, past_set)),
                     **dict(zip(self.present_names, present_set)), "logits": self.logits}
        for name, pointer in addresses.items():
            if not context.set_tensor_address(name, pointer):
                raise RuntimeError(f"the TensorRT engine has no input or output named {name}; build it again with "
                                   "gemma-export --resume-build DIR")

        start = time.perf_counter()
        if not context.execute_async_v3(self.stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (its log above says why)")
        rows = context.get_tensor_shape("logits")[1]
        logits = self._logits_to_host(B, rows, all_logits)
        self.run_seconds += time.perf_counter() - start

        self._current = (self._current + 1) % len(self.kv)
        self._past_length += S
        return logits

    def _logits_to_host(self, batch: int, rows: int, all_logits: bool) -> np.ndarray:
        """[B, rows, V] when all_logits, else the last row of each batch entry [B, V] (one strided copy)."""
        cudart, V = self.cudart, self.vocab_size
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if all_logits:
            out = np.empty((batch, rows, V), np.float32)
            check_cuda(cudart.cudaMemcpyAsync(out.ctypes.data, self.logits, out.nbytes, to_host, self.stream),
                       "cudaMemcpyAsync")
        else:
            out = np.empty((batch, V), np.float32)
            last = self.logits + (rows - 1) * V * 4
            check_cuda(cudart.cudaMemcpy2DAsync(out.ctypes.data, V * 4, last, rows * V * 4, V * 4, batch, to_host,
                                                self.stream), "cudaMemcpy2DAsync")
        check_cuda(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out
