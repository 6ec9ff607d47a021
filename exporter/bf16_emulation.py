"""Run a bfloat16 graph on a CPU that has no bfloat16 kernels.

ONNX Runtime's CPU provider implements Cast to and from bfloat16 and nothing else in that type, so a
bfloat16 graph (`--dtype bf16`, TensorRT's target) cannot be checked here as it is. `emulate_bfloat16`
writes a copy in which every bfloat16 tensor is carried in float32 and every node that produced one is
followed by Cast(bfloat16) -> Cast(float32): values are rounded to bfloat16 at exactly the points where
the real graph stores them, while the arithmetic inside each node runs in float32 (as a GPU's bfloat16
kernels accumulate in float32). Weights are bfloat16 values held exactly in float32 (a float32
initializer, such as the vocabulary table of text generation, stays as it is).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .graph_io import save_copy


def emulate_bfloat16(src: Path, dst: Path) -> Path:
    """Write the float32-carried copy of the bfloat16 graph `src` to `dst`; returns `dst`."""
    import onnx_ir as ir

    model = ir.load(src)
    graph = model.graph
    bf16, f32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT

    for value in list(graph.initializers.values()):
        if value.dtype == bf16:
            array = value.const_value.numpy().astype(np.float32)
            value.const_value = ir.tensor(array, name=value.name)
            value.type = ir.TensorType(f32)
    for value in graph.inputs:
        if value.dtype == bf16:
            value.type = ir.TensorType(f32)

    for node in list(graph):
        if node.op_type == "Constant" and "value" in node.attributes:
            tensor = node.attributes["value"].value
            if tensor.dtype == bf16:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(tensor.numpy().astype(np.float32)))
        makes_bf16 = False
        for attr in ("to", "dtype"):  # Cast, and the ops whose output type is an attribute
            if node.attributes.get_int(attr) == bf16.value:
                node.attributes[attr] = ir.AttrInt64(attr, f32.value)
                makes_bf16 = True
        for out in node.outputs:
            if out.dtype == bf16 or makes_bf16:
                _round_after(graph, node, out)
    return save_copy(model, dst)


def _round_after(graph, node, out) -> None:
    import onnx_ir as ir

    out.type = ir.TensorType(ir.DataType.FLOAT)
    down = ir.node("Cast", [out], {"to": ir.DataType.BFLOAT16.value})
    up = ir.node("Cast", [down.outputs[0]], {"to": ir.DataType.FLOAT.value})
    up.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    up.outputs[0].shape = out.shape
    uses = [(user, index) for user, index in out.uses() if user is not down]
    graph_outputs = [i for i, v in enumerate(graph.outputs) if v is out]
    for user, index in uses:
        user.replace_input_with(index, up.outputs[0])
    name = out.name
    for i in graph_outputs:  # keep the graph's output names
        out.name = f"{name}_unrounded"
        up.outputs[0].name = name
        graph.outputs[i] = up.outputs[0]
    graph.insert_after(node, [down, up])
