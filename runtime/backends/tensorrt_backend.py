"""TensorRT backend: the artifact's engine for this GPU, device buffers allocated once, the KV cache bound
in place from step to step, one CUDA stream.

    engine  engines/<gpu>-sm<cc>-trt<version>.plan, chosen by runtime.trt_device.select_engine (an engine
            built for another GPU or TensorRT version is refused, naming both)
    profiles one execution context per optimization profile (0: prefill, 1: decode; exporter/trt/plan.py);
            each call takes the first profile whose [min, max] box holds its shapes: a prompt longer
            than --max-input-len is fed in chunks
    buffers  input ids, mask and positions at their maximum sizes; the logits; KV buffers of
            [max_batch, kv_heads, slots, head_dim] (slots: max_length, or a sliding-window layer's ring).
            dynamic layout: two sets. past [B, H, P, D] is read from one set and present [B, H, P + S, D]
            written to the other, both contiguous, so the next step binds the other set as its past: the sets
            swap, nothing is copied.
            static layout: one set. The graph's TensorScatter is TensorRT's KV cache update layer
            (onnx-tensorrt imports it with addKVCacheUpdate, TensorRT 10.15+), which updates the cache in place:
            past and present are bound to the same address, the first row's of the range a step runs
            (rows [start, start + n) of a [max_batch, ...] buffer are contiguous).

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
        self.kv_itemsize = ITEMSIZE[kv.dtype]
        self.vocab_size = manifest.model.vocab_size
        self.max_rows = limits.max_input_len if self.logits_all else 1

        self.max_chunk = limits.max_input_len  # the prefill profile's most new tokens: longer prompts in chunks

        self._buffers: list[int] = []
        B, L = self.max_batch_size, self.max_length
        self.inputs = {name: self._malloc(B * L * 8) for name in INPUTS}
        self.logits = self._malloc(B * self.max_rows * self.vocab_size * 4)
        #: each cache tensor's (heads, slots, head_dim): the static layout's slots (max_length, or a ring's), the
        #: dynamic one's most
        self.kv_shapes = [(heads, n or L, dim) for heads, n, dim in kv.shapes_by_name.values()]
        self.row_bytes = [heads * n * dim * self.kv_itemsize for heads, n, dim in self.kv_shapes]
        self.ring_entries = kv.ring_entries
        sets = 1 if self.static else 2
        self.kv = [[self._malloc(B * row) for row in self.row_bytes] for _ in range(sets)]
        for buffers in self.kv:
            for pointer, row in zip(buffers, self.row_bytes):
                check_cuda(cudart.cudaMemsetAsync(pointer, 0, B * row, self.stream), "cudaMemsetAsync")
        self._current = 0
        log.info("TensorRT engine %s on %s: %d profiles, %.2f GiB of KV buffers", entry.file, device.name,
                 len(self.contexts), sets * B * sum(self.row_bytes) / 2**30)

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
        """Nothing to do: the buffers are allocated for the engine's largest batch and zeroed once (slots read past a
        row's length are masked, and what earlier rows left there is finite, where fresh memory might be NaN)."""

    def _trim(self, length: int) -> None:
        if not self.static and length > 0:
            # [B, H, P, D] -> [B, H, length, D]: B * H rows of length * D items, into the other set.
            past = self.past_length
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            for src, dst, (heads, _, dim) in zip(self.kv[self._current], self.kv[1 - self._current], self.kv_shapes):
                row = dim * self.kv_itemsize
                check_cuda(self.cudart.cudaMemcpy2DAsync(dst, length * row, src, past * row, length * row,
                                                         self.batch_size * heads, kind, self.stream),
                           "cudaMemcpy2DAsync")
            self._current = 1 - self._current

    @property
    def can_copy_rows(self) -> bool:
        return self.static

    def copy_rows(self, source: int, target: int, length: int) -> None:
        """Per cache tensor: a global layer's first `length` slots of each head (a 2D copy, one row per head), a
        ring's whole row (cudaMemcpy2DAsync, device to device)."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for pointer, row, (heads, slots, dim), ring in zip(self.kv[0], self.row_bytes, self.kv_shapes,
                                                            self.ring_entries):
            pitch = slots * dim * self.kv_itemsize
            width = pitch if ring else length * dim * self.kv_itemsize
            check_cuda(self.cudart.cudaMemcpy2DAsync(pointer + target * row, pitch, pointer + source * row, pitch,
                                                     width, heads, kind, self.stream), "cudaMemcpy2DAsync")
        check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    # -- a step --------------------------------------------------------------------------------------

    def _run(self, input_ids, attention_mask, position_ids, rows: slice, keep: int) -> np.ndarray:
        """Static layout: one profile run (the loop feeds at most max_chunk tokens). Dynamic: the new tokens in
        as many chunks as the profiles need, the mask growing with the cache."""
        B, S = input_ids.shape
        if self.static:
            index, size = self._profile_for(B, S, attention_mask.shape[1], 0)
            if size < S:
                raise ValueError(f"{S} new tokens exceed this engine's --max-input-len {size}; feed them in chunks")
            return self._enqueue(index, input_ids, attention_mask, position_ids, rows, 0, keep)
        pieces, start, past = [], 0, self.past_length
        while start < S:
            index, size = self._profile_for(B, S - start, None, past)
            pieces.append(self._enqueue(index, input_ids[:, start:start + size], attention_mask[:, : past + size],
                                        position_ids[:, start:start + size], rows, past, min(keep, size)))
            start, past = start + size, past + size
            self._current = 1 - self._current  # the present just written is the next past
        return np.concatenate(pieces, axis=1)

    def _profile_for(self, batch: int, remaining: int, total: int | None, past: int) -> tuple[int, int]:
        """The first profile that takes `batch` rows and some of the remaining tokens over the cache, and
        how many tokens it takes (as many as its box allows)."""
        order = list(range(len(self.contexts)))
        if remaining == 1:
            order.reverse()  # a decode step: the decode profile's kernels were tuned for it
        for index in order:
            low, _, high = self.engine.get_tensor_profile_shape("input_ids", index)
            size = min(remaining, high[1])
            shapes = self._shapes(batch, size, total if total is not None else past + size, past)
            if all(self._within(name, shape, index) for name, shape in shapes.items()):
                return index, size
        raise ValueError(
            f"no optimization profile of this engine takes {remaining} new tokens for {batch} rows over a cache of "
            f"{past} (limits: {self.max_batch_size} rows, {self.max_length} tokens); export and build "
            "again with larger --max-batch-size / --max-input-len / --max-length"
        )

    def _within(self, name: str, shape: tuple[int, ...], index: int) -> bool:
        low, _, high = self.engine.get_tensor_profile_shape(name, index)
        return all(lo <= s <= hi for s, lo, hi in zip(shape, low, high))

    def _shapes(self, batch: int, size: int, total: int, past: int) -> dict[str, tuple[int, ...]]:
        return {"input_ids": (batch, size), "attention_mask": (batch, total), "position_ids": (batch, size),
                **{name: (batch, heads, slots if self.static else past, dim)
                   for name, (heads, slots, dim) in zip(self.past_names, self.kv_shapes)}}

    def _enqueue(self, index: int, ids, mask, positions, rows: slice, past: int, keep: int) -> np.ndarray:
        cudart, context = self.cudart, self.contexts[index]
        B, S = ids.shape
        for name, shape in self._shapes(B, S, mask.shape[1], past).items():
            if not context.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT refused the shape {shape} of {name} in optimization profile {index} "
                                   "(its log above says why)")
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        host = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        host = {name: np.ascontiguousarray(value, dtype=np.int64) for name, value in host.items()}
        for name, value in host.items():
            check_cuda(cudart.cudaMemcpyAsync(self.inputs[name], value.ctypes.data, value.nbytes, to_device,
                                              self.stream), "cudaMemcpyAsync")
        if self.static:  # in place: past and present at the first row's offset
            past_set = present_set = [pointer + rows.start * row for pointer, row in zip(self.kv[0], self.row_bytes)]
        else:
            past_set, present_set = self.kv[self._current], self.kv[1 - self._current]
        addresses = {**self.inputs, **dict(zip(self.past_names, past_set)),
                     **dict(zip(self.present_names, present_set)), "logits": self.logits}
        for name, pointer in addresses.items():
            if not context.set_tensor_address(name, pointer):
                raise RuntimeError(f"the TensorRT engine has no input or output named {name}; build it again with "
                                   "gemma-export --resume-build DIR")

        start = time.perf_counter()
        if not context.execute_async_v3(self.stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (its log above says why)")
        rows_out = context.get_tensor_shape("logits")[1]
        logits = self._logits_to_host(B, rows_out, keep)
        self.run_seconds += time.perf_counter() - start
        return logits

    def _logits_to_host(self, batch: int, rows: int, keep: int) -> np.ndarray:
        """The last `keep` of each batch entry's `rows` logits rows, [B, keep, V] (one strided copy)."""
        cudart, V = self.cudart, self.vocab_size
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        keep = min(keep, rows)
        out = np.empty((batch, keep, V), np.float32)
        last = self.logits + (rows - keep) * V * 4
        check_cuda(cudart.cudaMemcpy2DAsync(out.ctypes.data, keep * V * 4, last, rows * V * 4, keep * V * 4, batch,
                                            to_host, self.stream), "cudaMemcpy2DAsync")
        check_cuda(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out
