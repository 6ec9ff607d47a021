"""A Triton Inference Server model repository for an artifact: `gemma-run triton-repo DIR --output REPO`.

    REPO/NAME/config.pbtxt        backend "python", decoupled; text_input (+ optional sampling inputs) -> text_output
    REPO/NAME/1/model.py          runtime/deploy/triton_model.py: the scheduler behind Triton's response senders
    REPO/NAME/1/artifact/         the artifact, hard-linked file by file (copied across file systems)

The inputs and output are named as TensorRT-LLM's and vLLM's backends name them, so Triton's generate extension
works the same: POST /v2/models/NAME/generate (one response) and /generate_stream (`"stream": true`: server-sent
events), and gRPC streaming. An artifact with a TensorRT engine gets a KIND_GPU instance group and the TensorRT
backend, any other KIND_CPU and ONNX Runtime; switch with `--backend` (or edit the instance group's kind and the
`backend` parameter: both are in config.pbtxt).

The artifact is hard-linked rather than linked by name: a repository mounted into a container (NGC's
tritonserver image) would find a symbolic link pointing outside the mount dangling, and a hard link costs no space
and cannot change under the server (an export replaces a directory whole, never a file in place). model.py checks
every file's sha256 when it loads (runtime.load).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..manifest import read_manifest
from ..serving.scheduler import check_servable

BACKENDS = ("auto", "onnxruntime", "tensorrt")
INPUTS = (  # name, type, dims; text_input is required, the rest optional
    ("text_input", "TYPE_STRING", "1"), ("max_tokens", "TYPE_INT32", "1"), ("temperature", "TYPE_FP32", "1"),
    ("top_p", "TYPE_FP32", "1"), ("top_k", "TYPE_INT32", "1"), ("min_p", "TYPE_FP32", "1"),
    ("repetition_penalty", "TYPE_FP32", "1"), ("seed", "TYPE_INT64", "1"), ("stop", "TYPE_STRING", "-1"),
    ("stream", "TYPE_BOOL", "1"),
)


def config_pbtxt(name: str, backend: str, instances: int, max_batch_size: int, max_queue: int) -> str:
    kind = "KIND_GPU" if backend == "tensorrt" else "KIND_CPU"
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {d} ]{" optional: true" if n != "text_input" else ""} }}'
                        for n, t, d in INPUTS)
    parameters = {"artifact": "artifact", "backend": backend, "max_batch_size": max_batch_size, "max_queue": max_queue}
    return "\n".join([
        f'name: "{name}"',
        'backend: "python"',
        "max_batch_size: 0  # the model batches itself: continuous batching in runtime/serving/scheduler.py",
        "model_transaction_policy { decoupled: true }",
        f"input [\n{inputs}\n]",
        'output [\n  { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }\n]',
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]",
        *(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in parameters.items()),
        "",
    ])


def write_repository(artifact: str | Path, output: str | Path, name: str = "gemma", instances: int = 1,
                     max_batch_size: int = 8, max_queue: int = 64, backend: str = "auto") -> Path:
    """Write the model repository; returns REPO/NAME. Refuses an artifact the scheduler cannot serve."""
    manifest = read_manifest(artifact)
    check_servable(manifest)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not supported; supported: {', '.join(BACKENDS)}")
    for option, value in (("instances", instances), ("max_batch_size", max_batch_size), ("max_queue", max_queue)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{option.replace('_', '-')} {value!r} must be a positive integer")
    if backend == "auto":
        backend = "tensorrt" if manifest.engines else "onnxruntime"
    model_dir = Path(output) / name
    if model_dir.exists():
        raise FileExistsError(f"{model_dir} already exists; remove it or pass another --output or --name")
    version = model_dir / "1"
    (version / "artifact").mkdir(parents=True)
    for relative in [*manifest.files, "manifest.json"]:
        _link_or_copy(manifest.path(relative), version / "artifact" / relative)
    shutil.copyfile(Path(__file__).with_name("triton_model.py"), version / "model.py")
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, backend, instances, max_batch_size, max_queue))
    return model_dir


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copyfile(source, target)
