"""A debug engine for divergence.locate: the marked graph (layer outputs added) built with the artifact's
own plan, run once on the prefill feeds. GPU only."""

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
