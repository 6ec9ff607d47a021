"""A debug engine for divergence.locate: the marked graph (layer outputs added) built with the artifact's
own plan, run once on the prefill feeds. GPU only.

The layer outputs are marked in the ONNX graph (divergence.marked_copy appends them to graph.output), and
TensorRT's ONNX parser marks every graph output as a network output, which keeps it from being fused away:
the same effect as Polygraphy's `--trt-outputs NAME...` (backend/trt/loader.py ModifyNetworkOutputs ->
backend/trt/util.py mark_outputs, which calls network.mark_output(tensor) after parsing), without touching the
network. The marked outputs change fusion around them, so the debug engine locates a divergence; it does not
time anything."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .build import build_engine
from .plan import BuildPlan


def engine_runner(manifest):
    """`run(marked_graph, feeds, names) -> {name: array}` for divergence.locate, on this GPU."""
    plan = BuildPlan.from_dict(manifest["trt"]["plan"])

    def run(marked: Path, feeds: dict, names: list[str]) -> dict:
        from runtime.backends.tensorrt_backend import run_engine_once

        with tempfile.TemporaryDirectory(prefix="gemma-debug-engine-") as scratch:
            result = build_engine(marked, plan, Path(scratch) / "debug.plan", progress=False)
            return run_engine_once(result.engine, feeds, names)

    return run
