"""The PyTorch models an export works with: the one it traces, built in the spec's precision and KV layout,
and the float32 reference it is verified against."""

from __future__ import annotations

import dataclasses

import torch

from models.gemma import Precision
from models.loading import Checkpoint, load_model
from runtime.spec import ELEMENT_TYPE, ArtifactSpec, PrecisionSpec


def torch_precision(precision: PrecisionSpec) -> Precision:
    """The spec's precision section as the torch dtypes models/ takes."""
    return Precision(**{f.name: getattr(torch, ELEMENT_TYPE[getattr(precision, f.name)])
                        for f in dataclasses.fields(PrecisionSpec)})


def load_for_export(ckpt: Checkpoint, spec: ArtifactSpec, progress: bool = True):
    """The model to trace: weights in the spec's dtype (the tied table in its own), wide values where it says."""
    layout, ring = (spec.kv.layout, spec.kv.ring_size) if spec.kv else ("dynamic", None)
    model, _ = load_model(ckpt, spec.graph.task, torch_precision(spec.precision), layout, progress, ring)
    return model


def reference_model(ckpt: Checkpoint, spec: ArtifactSpec, dequantized: dict | None = None):
    """The float32 PyTorch reference (its dynamic KV layout: a left-padded batch, as transformers runs it); with the
    quantized weights' dequantized values when the graph has them, so that parity measures the graph, not the
    quantization error (that one is an accuracy figure: scripts/bench_accuracy.py)."""
    model, _ = load_model(ckpt, spec.graph.task, progress=False)
    if dequantized:
        from .quantize import load_dequantized

        load_dequantized(model, dequantized)
    return model
