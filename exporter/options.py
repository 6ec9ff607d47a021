"""What `gemma-export` is asked for: the artifact's options (runtime/spec.py ArtifactOptions, resolved into the
artifact spec) and how this run goes about it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.spec import ArtifactOptions


@dataclass
class ExportOptions(ArtifactOptions):
    verify: bool = True  # check parity with PyTorch; an export that fails it writes nothing
    overwrite: bool = False
    tokenizer: Path | None = None  # ship this folder's tokenizer instead of the checkpoint's
    progress: bool = True
    build: bool = True  # --target trt: build the engine after the artifact (needs TensorRT and a GPU)
