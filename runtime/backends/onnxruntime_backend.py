"""ONNX Runtime backend: one InferenceSession, IO binding, KV buffers reused from step to step.

dynamic layout: present outputs are allocated by ONNX Runtime and bound back as the next step's past
  (OrtValues, no copy through numpy).
static layout: two preallocated buffer sets of max_length slots, past bound to one and present to
  the other, swapped each step (binding one buffer as both input and output of an operator that does
  not promise in-place updates is undefined in ONNX Runtime). Nothing is allocated per step but logits.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..manifest import Manifest
from .base import Backend

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
KV_DTYPES = {"float32": np.float32, "float16": np.float16}


class ProviderError(RuntimeError):
    """The requested execution provider cannot run here; the message says what to install or pass."""


class OnnxRuntimeBackend(Backend):
    def __init__(
        self,
        manifest: Manifest,
        provider: str = "cpu",
        allow_cpu_fallback: bool = False,
        threads: int | None = None,
    ):
        import onnxruntime as ort

        self.ort = ort
        self.manifest = manifest
        if provider not in PROVIDERS:
            raise ValueError(f"provider {provider!r} is not supported; supported: {', '.join(PROVIDERS)}")
        self.provider = provider
        providers = self._providers(provider, allow_cpu_fallback)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(manifest.path("model.onnx")), options, providers=providers)
        active = self.session.get_providers()
        if PROVIDERS[provider] not in active:
            self._fallback(provider, allow_cpu_fallback, f"the session runs on {active}")

        kv = manifest.kv_cache
        self.kv_layout = kv.get("layout", "dynamic")
        self.max_length = kv.get("max_length")
        self.kv_shape = (kv.get("num_kv_heads"), kv.get("head_dim"))
        self.kv_dtype = KV_DTYPES.get(kv.get("dtype", "float32"), np.float32)
        self.past_names = manifest.past_names
        self.present_names = manifest.present_names
        self.output_name = manifest["io"]["outputs"][0]
        self.binding = self.session.io_binding()
        self.batch_size = 0
        self._past_length = 0
        self.run_seconds = 0.0

    def _providers(self, provider: str, allow_cpu_fallback: bool) -> list:
        if provider == "cpu":
            return ["CPUExecutionProvider"]
        available = self.ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            self._fallback(provider, allow_cpu_fallback, f"this onnxruntime offers only {available}")
            return ["CPUExecutionProvider"]
        if provider == "tensorrt":
            cache = self.manifest.folder / "engines" / "ort-trt-cache"
            options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache), "trt_fp16_enable": True}
            return [(PROVIDERS[provider], options), "CUDAExecutionProvider", "CPUExecutionProvider"]
        return [PROVIDERS[provider], "CPUExecutionProvider"]

    @staticmethod
    def _fallback(provider: str, allowed: bool, why: str) -> None:
        message = (
            f"provider {provider!r} is not usable: {why}. Install onnxruntime-gpu with CUDA/TensorRT libraries "
            f"on a GPU machine (pip install 'gemma-deploy[gpu]'), or pass allow_cpu_fallback=True "
            f"(--allow-cpu-fallback) to run on the CPU"
        )
        if not allowed:
            raise ProviderError(message)
        log.warning("%s; falling back to the CPU as allowed", message)

    @property
    def past_length(self) -> int:
        return self._past_length

    def reset(self, batch_size: int, max_length: int) -> None:
        self.batch_size = batch_size
        self._past_length = 0
        self.run_seconds = 0.0
        heads, dim = self.kv_shape
        if self.kv_layout == "static":
            if max_length > self.max_length:
                raise ValueError(
                    f"{max_length} tokens do not fit the static KV cache of {self.max_length}; "
                    f"shorten the prompt or max_new_tokens, or export with a larger --max-length"
                )
            shape = (batch_size, heads, self.max_length, dim)
            self._buffers = [
                [self.ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype)) for _ in self.past_names]
                for _ in range(2)
            ]
            self._current = 0
        else:
            empty = self.ort.OrtValue.ortvalue_from_numpy(np.zeros((batch_size, heads, 0, dim), self.kv_dtype))
            self._past = [empty] * len(self.past_names)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        b.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        b.bind_output(self.output_name, "cpu")
        if self.kv_layout == "static":
            past, present = self._buffers[self._current], self._buffers[1 - self._current]
            for name, value in zip(self.past_names, past):
                b.bind_ortvalue_input(name, value)
            for name, value in zip(self.present_names, present):
                b.bind_ortvalue_output(name, value)
        else:
            for name, value in zip(self.past_names, self._past):
                b.bind_ortvalue_input(name, value)
            for name in self.present_names:
                b.bind_output(name, "cpu")
        start = time.perf_counter()
        self.session.run_with_iobinding(b)
        self.run_seconds += time.perf_counter() - start
        outputs = b.get_outputs()
        if self.kv_layout == "static":
            self._current = 1 - self._current
        else:
            self._past = outputs[1:]
        self._past_length = attention_mask.shape[1]
        return outputs[0].numpy()
