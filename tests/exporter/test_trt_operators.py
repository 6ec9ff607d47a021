"""The TensorRT operator check (exporter/trt/operators.py) on its shipped table and on tiny graphs built here."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.trt.operators import TABLE_PATH, check_graph, load_table, table_source

FLOAT = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), domains=(), functions=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", 20)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def _tensor(name, shape, dtype=FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _supported_model() -> onnx.ModelProto:
    """Embedding lookup, MatMul, Softmax: only operators the table marks Y."""
    weight = numpy_helper.from_array(np.ones((8, 4), np.float32), "weight")
    nodes = [
        helper.make_node("Gather", ["weight", "ids"], ["h"]),
        helper.make_node("MatMul", ["h", "proj"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    proj = numpy_helper.from_array(np.ones((4, 8), np.float32), "proj")
    return _model(nodes, [_tensor("ids", [1, 3], TensorProto.INT64)], [_tensor("probs", [1, 3, 8])], [weight, proj])


# -- the table ------------------------------------------------------------------------------------------


def test_table_has_the_core_operators():
    table = load_table()
    assert len(table) > 150  # the doc has about 200 rows, supported or not
    for op in ("MatMul", "Gather", "Softmax", "DequantizeLinear", "Where", "Range", "Cast", "ReduceMean"):
        assert table[op].supported, op
    assert "INT4" in table["DequantizeLinear"].types and "FP16" in table["MatMul"].types
    assert "zero" in table["DequantizeLinear"].restrictions  # `x_zero_point` must be zero
    assert not table["Unique"].supported and not table["MatMulInteger"].supported
    assert all(row.types for row in table.values() if row.supported)


def test_table_names_its_source():
    source = table_source()
    assert source["source"].startswith("https://github.com/onnx/onnx-tensorrt/blob/")
    assert source["source"].endswith("/docs/operators.md")
    assert re.match(r"[0-9a-f]{40} \(\d{4}-\d\d-\d\d", source["commit"])
    assert source["tensorrt"].startswith("11.1") and source["opsets"] == "9-24" and source["copied"] == "2026-12-01"


def test_the_static_layouts_operators_are_in_the_table():
    """TensorScatter (each row's KV write, in place) is TensorRT's since 10.15: the static graph is parsed whole."""
    table = load_table()
    assert table["TensorScatter"].supported and "`axis` must be -2" in table["TensorScatter"].restrictions
    assert table["Attention"].supported and "`softcap`" in table["Attention"].restrictions  # why it is not used


def test_a_malformed_table_is_refused_with_its_line(tmp_path):
    bad = tmp_path / "table.txt"
    bad.write_text("# header\nMatMul\tY\tFP32\t\nSoftmax\tmaybe\tFP32\t\n")
    with pytest.raises(ValueError, match=r"table\.txt:3"):
        load_table(bad)
    assert load_table(TABLE_PATH)["MatMul"].supported


# -- graphs ---------------------------------------------------------------------------------------------


def test_a_graph_of_supported_operators_passes():
    check = check_graph(_supported_model())
    assert check.ok and check.unsupported == {}
    assert check.counts == {"Gather": 1, "MatMul": 1, "Softmax": 1}
    assert check.opset == 20 and check.notes == []
    manifest = json.loads(json.dumps(check.to_dict()))  # JSON as it goes into the manifest
    assert manifest["ok"] and manifest["counts"]["MatMul"] == 1 and manifest["source"]["commit"]


def test_a_com_microsoft_operator_is_caught():
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["y"], domain="com.microsoft",
                              epsilon=1e-6),
             helper.make_node("MatMul", ["y", "w"], ["z"])]
    inits = [numpy_helper.from_array(np.ones(4, np.float32), "scale"),
             numpy_helper.from_array(np.ones((4, 4), np.float32), "w")]
    model = _model(nodes, [_tensor("x", [1, 4])], [_tensor("z", [1, 4])], inits, domains=["com.microsoft"])
    check = check_graph(model)
    assert not check.ok
    assert list(check.unsupported) == ["com.microsoft::SimplifiedLayerNormalization"]
    assert "com.microsoft" in check.unsupported["com.microsoft::SimplifiedLayerNormalization"]
    assert "MatMul" not in check.unsupported and check.counts["MatMul"] == 1
    assert "SimplifiedLayerNormalization" in check.table() and "UNSUPPORTED" in check.table()


def test_an_operator_outside_the_table_is_caught_in_onnx_domain_too():
    """ONNX Runtime registers SimplifiedLayerNormalization in the ONNX domain: still not one TensorRT parses."""
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["y"])
    model = _model([node], [_tensor("x", [1, 4]), _tensor("scale", [4])], [_tensor("y", [1, 4])])
    assert "not in TensorRT's ONNX operator table" in check_graph(model).unsupported["SimplifiedLayerNormalization"]


def test_an_operator_the_table_marks_unsupported_is_caught():
    assert not load_table()["Det"].supported  # the doc: | Det | N |
    node = helper.make_node("Det", ["x"], ["d"])
    check = check_graph(_model([node], [_tensor("x", [3, 3])], [_tensor("d", [])]))
    assert list(check.unsupported) == ["Det"] and "marked N" in check.unsupported["Det"]


def test_operators_inside_an_if_subgraph_are_found():
    then_branch = helper.make_graph([helper.make_node("Det", ["x"], ["t"])], "then", [], [_tensor("t", [])])
    else_branch = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["e"], keepdims=0)], "else", [],
                                    [_tensor("e", [])])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=then_branch, else_branch=else_branch)
    model = _model([node], [_tensor("cond", [], TensorProto.BOOL), _tensor("x", [3, 3])], [_tensor("out", [])])
    check = check_graph(model)
    assert check.counts == {"If": 1, "Det": 1, "ReduceSum": 1}
    assert list(check.unsupported) == ["Det"]
    assert "axes" in check.restrictions["ReduceSum"]  # the doc: `axes` must be an initializer


def test_a_local_function_is_checked_by_its_body():
    """TensorRT's parser imports a model's local functions: their body is what counts, not the call."""
    body = [helper.make_node("Softmax", ["a"], ["b"]), helper.make_node("Det", ["b"], ["c"])]
    function = helper.make_function("local", "SoftDet", ["a"], ["c"], body, [helper.make_opsetid("", 20)])
    node = helper.make_node("SoftDet", ["x"], ["y"], domain="local")
    check = check_graph(_model([node], [_tensor("x", [3, 3])], [_tensor("y", [])], domains=["local"],
                               functions=[function]))
    assert check.counts == {"Softmax": 1, "Det": 1} and list(check.unsupported) == ["Det"]


def test_a_newer_opset_is_noted_not_refused():
    """A graph of an opset newer than the table documents (9..24) is checked, with a note."""
    model = _supported_model()
    model.opset_import[0].version = 25
    check = check_graph(model)
    assert check.ok and check.opset == 25
    assert len(check.notes) == 1 and "opset 25" in check.notes[0] and "opset 25" in check.table()


# -- files ----------------------------------------------------------------------------------------------


def test_a_file_is_read_without_its_external_data(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_supported_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    (tmp_path / "model.onnx.data").unlink()  # loading the weights would now fail
    check = check_graph(path)
    assert check.ok and check.counts["Gather"] == 1


def test_a_file_that_is_not_onnx_is_named(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a protobuf\n" * 10)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not an ONNX model"):
        check_graph(path)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        check_graph(tmp_path / "missing.onnx")
    with pytest.raises(IsADirectoryError, match="model.onnx"):
        check_graph(tmp_path)
