"""ONNX Runtime backend: one InferenceSession, IO binding, the KV cache kept as OrtValues.

dynamic layout: the present outputs are allocated by ONNX Runtime on the provider's device and bound
  as the next step's past as they are: no copy through numpy.
static layout: buffers of max_length slots allocated once per batch. Past and present are two sets
  swapped every step, each with its own IOBinding prepared at reset (binding one buffer as both the
  input and the output of an operator that does not promise in-place updates is undefined in ONNX
  Runtime); one set bound as both when the manifest says `shares_buffers`. Per step only the ids,
  mask, positions and logits are bound: nothing is allocated but the logits.

Providers: "cpu", "cuda", "tensorrt" (onnxruntime-gpu). A provider that cannot run here is an error
(ProviderError), never a silent CPU fallback, unless allow_cpu_fallback=True, which logs a warning.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..manifest import ArtifactError, Manifest
from ..spec import ELEMENT_TYPE
from .base import Backend

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class ProviderError(RuntimeError):
    """The requested execution provider cannot run here; the message says what to install or pass."""


class OnnxRuntimeBackend(Backend):
    def __init__(self, manifest: Manifest, provider: str = "cpu", allow_cpu_fallback: bool = False,
                 threads: int | None = None):
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise ValueError(f"provider {provider!r} is not supported; supported: {', '.join(PROVIDERS)}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads {threads!r} is out of range; expected an integer >= 1 (or None for all cores)")
        if manifest.precision.dtype == "bf16":
            raise ValueError("this artifact is bfloat16, which ONNX Runtime's CPU provider cannot run (no bfloat16 "
                             "kernels); build its TensorRT engine on a GPU, or export with --dtype fp16 or fp32")
        super().__init__(manifest)
        self.ort = ort
        self.session = self._session(provider, allow_cpu_fallback, threads)
        self.provider = provider if PROVIDERS[provider] in self.session.get_providers() else "cpu"
        self.device = "cpu" if self.provider == "cpu" else "cuda"
        if manifest.kv is not None:
            self.kv_heads, self.head_dim = manifest.kv.num_kv_heads, manifest.kv.head_dim
            self.kv_dtype = np.dtype(ELEMENT_TYPE[manifest.kv.dtype])
        self._binding = self.session.io_binding()

    # -- session -------------------------------------------------------------------------------------

    def _session(self, provider: str, allow_cpu_fallback: bool, threads: int | None):
        ort = self.ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
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
        if self.kv_layout == "static":
            self._reset_static(batch_size)
        else:
            self._past = [self._kv_value((batch_size, self.kv_heads, 0, self.head_dim))] * len(self.past_names)

    def _kv_value(self, shape):
        return self.ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype), self.device, 0)

    def _reset_static(self, batch_size: int) -> None:
        """Zeroed buffers (unused slots are masked, but NaN garbage times a zero weight is NaN) and one
        IOBinding per direction with the cache bound."""
        shape = (batch_size, self.kv_heads, self.max_length, self.head_dim)
        sets = 1 if self.shares_buffers else 2
        self._buffers = [[self._kv_value(shape) for _ in self.past_names] for _ in range(sets)]
        self._bindings = []
        for i in range(sets):
            binding = self.session.io_binding()
            binding.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in binding order
            for name, value in zip(self.past_names, self._buffers[i]):
                binding.bind_ortvalue_input(name, value)
            for name, value in zip(self.present_names, self._buffers[(i + 1) % sets]):
                binding.bind_ortvalue_output(name, value)
            self._bindings.append(binding)
        self._current = 0  # the set that holds the cache

    def _trim(self, length: int) -> None:
        if self.kv_layout == "dynamic":  # one copy per trim (a chat turn), not per step
            self._past = [
                self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :length]), self.device, 0)
                for v in self._past
            ]

    # -- a step --------------------------------------------------------------------------------------

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                all_logits: bool = False) -> np.ndarray:
        self.check_logits(all_logits)
        if self.kv_layout == "static":
            binding = self._bindings[self._current]
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

        start = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.run_seconds += time.perf_counter() - start

        outputs = binding.get_outputs()
        if self.kv_layout == "static":
            self._current = (self._current + 1) % len(self._buffers)
        else:
            self._past = outputs[1:]
        self._past_length = attention_mask.shape[1]
        logits = outputs[0].numpy()  # a view of ONNX Runtime's buffer: copy what we keep
        return np.array(logits) if all_logits else np.array(logits[:, -1])


def _fallback(provider: str, allowed: bool, why: str) -> None:
    message = (
        f"provider {provider!r} is not usable: {why}. Install onnxruntime-gpu with the CUDA/TensorRT libraries "
        f"on a GPU machine (pip install 'gemma-deploy[gpu]'), or pass allow_cpu_fallback=True "
        f"(--allow-cpu-fallback) to run on the CPU"
    )
    if not allowed:
        raise ProviderError(message)
    log.warning("%s; running on the CPU as allowed", message)
