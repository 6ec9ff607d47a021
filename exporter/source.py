"""The PyTorch models an export works with: the one it traces, built in the spec's precision and KV layout,
and the float32 reference it is verified against (with the quantized weights' dequantized values, when the graph
has them: `load_dequantized`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from models.gemma import Precision, decoder_of
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
        load_dequantized(model, dequantized)
    return model


def load_dequantized(model, dequantized: dict[str, np.ndarray]) -> None:
    """Put the dequantized weights exporter/quantize.py returns into the PyTorch `model` (a fake-quantized
    reference).

    Graph initializer names are the traced module's: `model.<path>.weight` holds a Linear's weight as
    [in, out]; `model.lm_head.weight_t` (or `...embed_tokens.weight_t`) the tied embedding as [hidden, vocab].
    """
    params = dict(model.named_parameters())
    for name, weight in dequantized.items():
        path = name.removeprefix("model.")
        if path.endswith("weight_t"):  # the tied embedding / lm_head
            target = decoder_of(model).embed_tokens.weight
        elif path in params:
            target = params[path]
        else:
            raise KeyError(f"quantized initializer {name} matches no parameter of the reference model")
        with torch.no_grad():
            target.copy_(torch.from_numpy(weight.T))

