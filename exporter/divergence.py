"""Where two runs of one graph part ways: mark intermediate values as outputs (as Polygraphy's
`--onnx-outputs mark` does, but only at layer boundaries), run both, compare in graph order.

    points = layer_points(graph)                    the value each decoder layer, attention and MLP ends with
    with marked_copy(DIR/model.onnx, points) as m:  a copy of the graph that also outputs them
        reference, candidate = run_a(m, feeds), run_b(m, feeds)
    report = compare_points(reference, candidate, points, rtol)
    report.first                                   the first point whose relative difference exceeds rtol

The points come from the scopes torch.onnx records on each node (metadata "pkg.torch.onnx.name_scopes",
e.g. [..., "model.model.layers.3", "model.model.layers.3.self_attn", "node name"]): the last node of a
scope in graph order computes that module's output.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

SCOPES = re.compile(r"layers\.\d+(\.(self_attn|mlp))?$")
# max |a - b| / max |a| above which a point counts as diverged, per precision of the graph
RELATIVE_TOLERANCES = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


@dataclass(frozen=True)
class Point:
    scope: str  # model.model.layers.3.self_attn
    value: str  # the graph value that module ends with


@dataclass
class Divergence:
    rows: list[dict] = field(default_factory=list)  # per point: scope, value, max_abs_diff, relative
    first: dict | None = None  # the first row over the tolerance

    def to_dict(self) -> dict:
        return {"first": self.first, "rows": self.rows}


def layer_points(graph: onnx.ModelProto) -> list[Point]:
    """The output value of every decoder layer, attention and MLP, in graph order."""
    typed = {v.name for v in graph.graph.value_info}
    last: dict[str, tuple[int, str]] = {}
    for index, node in enumerate(graph.graph.node):
        scopes = _scopes(node)
        for scope in scopes:
            if SCOPES.search(scope) and node.output and node.output[0] in typed:
                last[scope] = (index, node.output[0])
    return [Point(scope, value) for scope, (_, value) in sorted(last.items(), key=lambda item: item[1][0])]


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                return list(ast.literal_eval(prop.value))[:-1]  # the last entry names the node itself
            except (ValueError, SyntaxError):
                return []
    return []


@contextlib.contextmanager
def marked_copy(onnx_path: Path, points: list[Point]) -> Iterator[Path]:
    """A temporary copy of the graph with the points added as outputs; its weights are the original's
    external data file, hard-linked (ONNX Runtime refuses a symbolic link out of the model's folder), or
    copied when the temporary folder is on another file system."""
    graph = onnx.load(str(onnx_path), load_external_data=False)
    types = {v.name: v for v in graph.graph.value_info}
    existing = {o.name for o in graph.graph.output}
    for point in points:
        if point.value not in existing:
            graph.graph.output.append(types[point.value])
    with tempfile.TemporaryDirectory(prefix="gemma-marked-") as scratch:
        folder = Path(scratch)
        for data in onnx_path.parent.glob(f"{onnx_path.name}.data"):
            try:
                os.link(data.resolve(), folder / data.name)
            except OSError:
                shutil.copyfile(data, folder / data.name)
        path = folder / onnx_path.name
        onnx.save(graph, str(path))
        yield path


def compare_points(reference: dict, candidate: dict, points: list[Point], rtol: float) -> Divergence:
    report = Divergence()
    for point in points:
        a = np.asarray(reference[point.value], np.float32)
        b = np.asarray(candidate[point.value], np.float32)
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        relative = diff / max(float(np.abs(a).max()) if a.size else 0.0, 1e-6)
        row = {"scope": point.scope, "value": point.value, "max_abs_diff": diff, "relative": relative,
               "finite": bool(np.isfinite(b).all())}
        report.rows.append(row)
        if report.first is None and (relative > rtol or not row["finite"]):
            report.first = row
    return report


def onnxruntime_outputs(onnx_path: Path, feeds: dict, names: list[str]) -> dict:
    """The named outputs of the graph on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, feeds)))


def locate(onnx_path: Path, feeds: dict, run_candidate, dtype: str = "fp32", run_reference=None) -> Divergence:
    """Compare the candidate (e.g. a TensorRT engine built from the marked graph) with ONNX Runtime on
    the same graph at every layer point; `run_candidate(marked_path, feeds, names) -> {name: array}`."""
    points = layer_points(onnx.load(str(onnx_path), load_external_data=False))
    if not points:
        raise ValueError(f"{onnx_path} has no layer scopes to mark (a graph traced by an older exporter?)")
    names = [p.value for p in points]
    run_reference = run_reference or onnxruntime_outputs
    with marked_copy(onnx_path, points) as marked:
        reference = run_reference(marked, feeds, names)
        candidate = run_candidate(marked, feeds, names)
    return compare_points(reference, candidate, points, RELATIVE_TOLERANCES.get(dtype, 1e-3))
