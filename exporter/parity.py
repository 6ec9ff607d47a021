"""gemma-parity: check an existing artifact against its PyTorch source (the export's verification, standalone),
through a runtime backend: ONNX Runtime, or the artifact's TensorRT engine on a GPU."""

from __future__ import annotations

from pathlib import Path

from runtime.manifest import read_manifest
from runtime.spec import ModelSpec

from .source import reference_model
from .verify import DEFAULT_PROMPTS, ParityReport, verify

BACKENDS = ("onnxruntime", "tensorrt")


def check_artifact(artifact: str | Path, model: str, prompts=None, new_tokens: int = 8, tolerance=None,
                   backend: str = "onnxruntime") -> ParityReport:
    """The artifact run by a runtime backend against `model` in PyTorch, and against ONNX Runtime on the same
    graph. A TensorRT engine that fails is traced to the first layer output that differs from ONNX
    Runtime's (a debug engine with those outputs marked is built from the same plan)."""
    from models.loading import resolve

    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not supported; supported: {', '.join(BACKENDS)}")
    manifest = read_manifest(artifact)
    ckpt = resolve(model)
    theirs = ModelSpec.from_config(ckpt.config)
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size"):
        if getattr(manifest.model, key) != getattr(theirs, key):
            raise ValueError(f"the artifact does not match {model}: {key} is {getattr(manifest.model, key)} in the "
                             f"artifact, {getattr(theirs, key)} in the model")
    folder = Path(artifact)
    if backend == "tensorrt":
        from runtime.backends.tensorrt_backend import TensorRTBackend

        from .trt.debug import engine_runner

        runner, locate_with = TensorRTBackend(manifest), engine_runner(manifest)
    elif manifest.precision.dtype == "bf16":  # no bfloat16 kernels in ONNX Runtime's CPU provider: the emulated graph
        runner, locate_with = None, None
    else:
        from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        runner, locate_with = OnnxRuntimeBackend(manifest), None
    return verify(
        lambda: reference_model(ckpt, manifest.spec),
        folder / "model.onnx",
        manifest.spec,
        ckpt.config.pad_token_id,
        tokenizer_dir=folder if (folder / "tokenizer.json").is_file() else None,
        prompts=prompts or DEFAULT_PROMPTS,
        new_tokens=new_tokens,
        tolerance=tolerance,
        backend=runner,
        locate_with=locate_with,
    )
