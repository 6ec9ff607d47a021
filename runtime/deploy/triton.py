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
from ..serving.options import ServeOptions
from ..serving.scheduler import check_servable

# the ServeOptions a Triton model takes (the HTTP ones are Triton's own business), as config.pbtxt parameters
ENGINE_OPTIONS = ("max_batch_size", "max_queue", "prefill_chunk", "prefix_cache")
LOAD_OPTIONS = ("backend", "provider", "threads")
INPUTS = (  # name, type, dims; text_input is required, the rest optional
    ("text_input", "TYPE_STRING", "1"), ("max_tokens", "TYPE_INT32", "1"), ("temperature", "TYPE_FP32", "1"),
    ("top_p", "TYPE_FP32", "1"), ("top_k", "TYPE_INT32", "1"), ("min_p", "TYPE_FP32", "1"),
    ("repetition_penalty", "TYPE_FP32", "1"), ("seed", "TYPE_INT64", "1"), ("stop", "TYPE_STRING", "-1"),
    ("stream", "TYPE_BOOL", "1"),
)


def parameters(options: ServeOptions, backend: str) -> dict[str, str]:
    """config.pbtxt's parameters for `options` (triton_model.py reads them back with `options_from`)."""
    given = {name: getattr(options, name) for name in ENGINE_OPTIONS}
    given.update({name: getattr(options.load, name) for name in LOAD_OPTIONS}, backend=backend)
    return {"artifact": "artifact", **{k: str(v).lower() if isinstance(v, bool) else str(v)
                                       for k, v in given.items() if v is not None}}


def options_from(values: dict[str, str]) -> ServeOptions:
    """The ServeOptions config.pbtxt's parameters hold (their types from the tables)."""
    from ..params import LoadOptions

    def read(table, names):
        out = {}
        for name in names:
            if name in values:
                kind = table.fields()[name][1].kind
                out[name] = values[name] == "true" if kind is bool else kind(values[name])
        return out

    return ServeOptions(**read(ServeOptions, ENGINE_OPTIONS), load=LoadOptions(**read(LoadOptions, LOAD_OPTIONS)))


def config_pbtxt(name: str, instances: int, options: ServeOptions, backend: str) -> str:
    kind = "KIND_GPU" if backend == "tensorrt" else "KIND_CPU"
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {d} ]{" optional: true" if n != "text_input" else ""} }}'
                        for n, t, d in INPUTS)
    return "\n".join([
        f'name: "{name}"',
        'backend: "python"',
        "max_batch_size: 0  # the model batches itself: continuous batching in runtime/serving/scheduler.py",
        "model_transaction_policy { decoupled: true }",
        f"input [\n{inputs}\n]",
        'output [\n  { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }\n]',
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]",
        *(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
          for k, v in parameters(options, backend).items()),
        "",
    ])


def write_repository(artifact: str | Path, output: str | Path, name: str = "gemma", instances: int = 1,
                     options: ServeOptions | None = None) -> Path:
    """Write the model repository; returns REPO/NAME. Refuses an artifact the scheduler cannot serve."""
    options = options or ServeOptions()
    manifest = read_manifest(artifact)
    check_servable(manifest)
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ValueError(f"--instances {instances!r} must be a positive integer")
    backend = options.load.backend
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
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, instances, options, backend))
    return model_dir


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copyfile(source, target)
