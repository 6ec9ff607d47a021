"""gemma-parity: check an existing artifact against its PyTorch source (the export's verification, standalone),
through a runtime backend: ONNX Runtime, or the artifact's TensorRT engine on a GPU."""

from __future__ import annotations

from pathlib import Path

from runtime.manifest import read_manifest

from .trace import GraphSpec
from .verify import DEFAULT_PROMPTS, ParityReport, verify


BACKENDS = ("onnxruntime", "tensorrt")


def check_artifact(artifact: str | Path, model: str, prompts=None, new_tokens: int = 8, tolerance=None,
                   backend: str = "onnxruntime") -> ParityReport:
    """The artifact run by a runtime backend against `model` in PyTorch, and against ONNX Runtime on the same
    graph. A TensorRT engine that fails is traced to the first layer output that differs from ONNX
    Runtime's (a debug engine with those outputs marked is built from the same plan)."""
    from models.loading import load_model, resolve

    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not supported; supported: {', '.join(BACKENDS)}")
    manifest = read_manifest(artifact)
    ckpt = resolve(model)
    config = ckpt.config
    mine = manifest["config"]
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size"):
        if mine[key] != getattr(config, key):
            raise ValueError(
                f"the artifact does not match {model}: {key} is {mine[key]} in the artifact, {getattr(config, key)} in the model"
            )
    spec = GraphSpec(
        task=manifest.task,
        num_layers=config.num_hidden_layers,
        kv_layout=manifest.kv.layout,
        max_length=manifest.kv.max_length,
        logits=manifest.logits,
    )
    folder = Path(artifact)
    if backend == "tensorrt":
        from runtime.backends.tensorrt_backend import TensorRTBackend

        from .trt.debug import engine_runner

        runner, locate_with = TensorRTBackend(manifest), engine_runner(manifest)
    elif manifest.dtype == "bfloat16":  # no bfloat16 kernels in ONNX Runtime's CPU provider: the emulated graph
        runner, locate_with = None, None
    else:
        from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        runner, locate_with = OnnxRuntimeBackend(manifest), None
    return verify(
        lambda: load_model(ckpt, task=manifest.task, progress=False)[0],
        folder / "model.onnx",
        spec,
        config,
        dtype=manifest.dtype,
        tokenizer_dir=folder if (folder / "tokenizer.json").is_file() else None,
        prompts=prompts or DEFAULT_PROMPTS,
        new_tokens=new_tokens,
        tolerance=tolerance,
        backend=runner,
        locate_with=locate_with,
    )
