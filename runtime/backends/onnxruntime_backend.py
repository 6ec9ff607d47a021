"""ONNX Runtime backend: one InferenceSession, IO binding, the KV cache kept as OrtValues.

dynamic layout: the present outputs are allocated by ONNX Runtime on the provider's device and bound
  as the next step's past as they are: no copy through numpy.
static layout: one buffer [batch, kv_heads, slots, head_dim] per cache tensor (slots: max_length, or a sliding-window
  layer's ring: manifest kv.slots), allocated at reset. A step
  over rows [start, start + n) binds the same memory, at that row's offset, as the past input and the present
  output: the graph's TensorScatter (or the fused GroupQueryAttention) writes the new entries in place, and
  nothing is allocated but the logits. One IOBinding per row range, made once and reused.

Providers: "cpu", "cuda", "tensorrt" (onnxruntime-gpu). A provider that cannot run here is an error
(ProviderError), never a silent CPU fallback, unless allow_cpu_fallback=True, which logs a warning.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..manifest import ArtifactError, Manifest
from ..params import PROVIDERS as PROVIDER_NAMES
from ..spec import ELEMENT_TYPE, LOGITS_TO_KEEP
from .base import Backend

log = logging.getLogger(__name__)

# the execution provider of each of runtime.params.PROVIDERS
PROVIDERS = dict(zip(PROVIDER_NAMES, ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")))


class ProviderError(RuntimeError):
    """The requested execution provider cannot run here; the message says what to install or pass."""


class OnnxRuntimeBackend(Backend):
    def __init__(self, manifest: Manifest, provider: str = "cpu", allow_cpu_fallback: bool = False,
                 threads: int | None = None, spin: bool = True):
        import onnxruntime as ort

        if manifest.precision.dtype == "bf16":
            raise ValueError("this artifact is bfloat16, which ONNX Runtime's CPU provider cannot run (no bfloat16 "
                             "kernels); build its TensorRT engine on a GPU, or export with --dtype fp16 or fp32")
        super().__init__(manifest)
        self.ort = ort
        self.session = self._session(provider, allow_cpu_fallback, threads, spin)
        self.provider = provider if PROVIDERS[provider] in self.session.get_providers() else "cpu"
        self.device = "cpu" if self.provider == "cpu" else "cuda"
        if manifest.kv is not None:
            self.kv_shapes = list(manifest.kv.shapes_by_name.values())  # (heads, slots or None, head_dim) per tensor
            self.kv_dtype = np.dtype(ELEMENT_TYPE[manifest.kv.dtype])
            self.ring_entries = manifest.kv.ring_entries
        self._binding = self.session.io_binding()

    # -- session -------------------------------------------------------------------------------------

    def _session(self, provider: str, allow_cpu_fallback: bool, threads: int | None, spin: bool):
        ort = self.ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = self._providers(provider, allow_cpu_fallback)
        path = self.manifest.path("model.onnx")
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime's InvalidProtobuf, InvalidGraph, Fail...
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ArtifactError(
                f"{path} cannot be loaded by onnxruntime {ort.__version__}: {reason}; export the artifact again "
                "(or upgrade onnxruntime if the graph needs a newer opset)"
            ) from e
        # onnxruntime-gpu lists CUDA and TensorRT as available, then drops them when their libraries
        # fail to load: only the session knows what it runs on.
        if PROVIDERS[provider] not in session.get_providers():
            _fallback(provider, allow_cpu_fallback, f"the session runs on {session.get_providers()}")
        return session

    def _providers(self, provider: str, allow_cpu_fallback: bool) -> list:
        if provider == "cpu":
            return ["CPUExecutionProvider"]
        available = self.ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            _fallback(provider, allow_cpu_fallback, f"this onnxruntime offers only {available}")
            return ["CPUExecutionProvider"]
        if provider == "tensorrt":
            cache = self.manifest.folder / "engines" / "ort-trt-cache"
            options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
            return [(PROVIDERS["tensorrt"], options), "CUDAExecutionProvider", "CPUExecutionProvider"]
        return [PROVIDERS[provider], "CPUExecutionProvider"]

    # -- the cache -----------------------------------------------------------------------------------

    def _reset(self, batch_size: int) -> None:
        if self.static:
            # Allocated zeroed for the largest batch so far, then reused: the slots a step reads past a row's length
            # are masked (a zero weight), and what earlier rows left there is finite, where never-written memory
            # might hold NaN (and NaN times zero is NaN).
            if batch_size > getattr(self, "_allocated", 0):
                # On the CPU an OrtValue made from a numpy array shares its memory: the arrays copy rows in place.
                self._arrays = [np.zeros((batch_size, *shape), self.kv_dtype) for shape in self.kv_shapes]
                self._buffers = [self.ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for a in self._arrays]
                self._bindings: dict[tuple[int, int], object] = {}
                self._allocated = batch_size
        else:
            self._past = [self._kv_value((batch_size, heads, 0, head_dim)) for heads, _, head_dim in self.kv_shapes]

    @property
    def can_copy_rows(self) -> bool:
        return self.static and self.device == "cpu"

    def copy_rows(self, source: int, target: int, length: int) -> None:
        """A global layer's first `length` slots, a ring's whole row (its slots hold positions mod its size)."""
        if not self.can_copy_rows:
            raise NotImplementedError("rows of the cache are copied on the CPU provider only")
        for array, ring in zip(self._arrays, self.ring_entries):
            end = array.shape[2] if ring else length
            array[target, :, :end] = array[source, :, :end]

    def fill(self, value: float) -> None:
        """Benchmarks: write `value` to every slot of the static cache. Memory never written maps one shared page of
        zeros, which a step reads from the CPU's cache, not from memory: a decode after `KVCache.assume` over such
        slots measured up to 1.6x faster than over a context that was computed (full buffers at 32k)."""
        for array in self._arrays:
            array.fill(value)

    def _kv_value(self, shape):
        return self.ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype), self.device, 0)

    def _static_binding(self, rows: slice):
        """The IOBinding of rows [start, stop): past and present bound to the same memory, at the rows' offset."""
        key = (rows.start, rows.stop)
        if key not in self._bindings:
            binding = self.session.io_binding()
            binding.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in binding order
            for past, present, buffer, (heads, slots, head_dim) in zip(self.past_names, self.present_names,
                                                                        self._buffers, self.kv_shapes):
                shape = [rows.stop - rows.start, heads, slots, head_dim]
                row_bytes = heads * slots * head_dim * self.kv_dtype.itemsize
                pointer = buffer.data_ptr() + rows.start * row_bytes
                binding.bind_input(past, self.device, 0, self.kv_dtype, shape, pointer)
                binding.bind_output(present, self.device, 0, self.kv_dtype, shape, pointer)
            self._bindings[key] = binding
        return self._bindings[key]

    def _trim(self, length: int) -> None:
        if not self.static:  # one copy per trim (a chat turn), not per step
            self._past = [
                self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :length]), self.device, 0)
                for v in self._past
            ]

    # -- a step --------------------------------------------------------------------------------------

    def _run(self, input_ids, attention_mask, position_ids, rows: slice, keep: int) -> np.ndarray:
        if self.static:
            binding = self._static_binding(rows)
            binding.bind_output("logits", "cpu")  # rebinding a name replaces it in place
        else:
            binding = self._binding
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            binding.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in binding order
            for name, value in zip(self.past_names, self._past):
                binding.bind_ortvalue_input(name, value)
            for name in self.present_names:
                binding.bind_output(name, self.device)
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        if self.keeps_logits:
            binding.bind_cpu_input(LOGITS_TO_KEEP, np.array(keep, np.int64))

        start = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.run_seconds += time.perf_counter() - start

        outputs = binding.get_outputs()
        if not self.static:
            self._past = outputs[1:]
        logits = outputs[0].numpy()  # a view of ONNX Runtime's buffer: copy what we keep
        return np.array(logits[:, -keep:])


def _fallback(provider: str, allowed: bool, why: str) -> None:
    message = (
        f"provider {provider!r} is not usable: {why}. Install onnxruntime-gpu with the CUDA/TensorRT libraries "
        f"on a GPU machine (pip install 'gemma-deploy[gpu]'), or pass allow_cpu_fallback=True "
        f"(--allow-cpu-fallback) to run on the CPU"
    )
    if not allowed:
        raise ProviderError(message)
    log.warning("%s; running on the CPU as allowed", message)
