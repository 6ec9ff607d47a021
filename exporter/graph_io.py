"""Rewrite a saved graph in place: model.onnx and its model.onnx.data are replaced together."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def save_copy(model, dst: Path) -> Path:
    """Save the onnx_ir `model` to a new `dst` (its folder created), weights in `dst.name + '.data'`."""
    import onnx_ir as ir

    dst.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, dst, external_data=f"{dst.name}.data")
    return dst


def save_in_place(model, path: Path) -> None:
    """Save the onnx_ir `model` over `path`, weights in `path.name + '.data'`.

    The new files are written beside the old ones first: the old external data stays readable while the
    model (whose tensors may still point into it) is serialised.
    """
    import onnx_ir as ir

    staging = path.parent / f".{path.stem}.rewrite"
    staging.mkdir(exist_ok=True)
    try:
        ir.save(model, staging / path.name, external_data=f"{path.name}.data")
        for name in (path.name, f"{path.name}.data"):
            os.replace(staging / name, path.parent / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
